"""Sequential rules (SR; Ludewig & Jannach 2018): "after A, listeners play B".

Within one session, when a track B follows A by d steps (1 <= d <= ``steps``), the rule
A -> B gains ``1 / d`` (session-rec's ``div`` weighting); rules only point forward and never
cross a session boundary (unless ``within_session=False``). A query reads the rules of its
last ``query_window`` tracks (newest first, weighted ``query_decay ** distance``; the
default reads the last track only, as SR does). Rules live in the co-occurrence arena
(:class:`SessionCooccurrence`, whose storage, pruning to ``max_neighbours``, eviction and
compiled scoring this reuses), but it is a separate, separately evaluated model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numba
import numpy as np

from stream.models import _kernels as _k
from stream.models._vocab import Vocabulary, grow_rows
from stream.models.base import Interaction
from stream.models.cooccurrence import SessionCooccurrence

_jit: Any = numba.njit(cache=True, nogil=True)


@_jit
def sr_learn(start, size, cap, total, nbr, val, used, track, prevs, w, max_nbr):  # type: ignore[no-untyped-def]
    """``prevs[d - 1] -> track`` gains ``w / d`` (prevs newest first)."""
    for i in range(prevs.shape[0]):
        prev = prevs[i]
        if prev != track:
            used = _k.cooc_add(start, size, cap, total, nbr, val, used, prev, track,
                               w / (i + 1), max_nbr)
    return used


class SequentialRules(SessionCooccurrence):
    """Forward rules within a session, weighted ``1 / steps apart``.

    >>> m = SequentialRules()
    >>> for i, t in enumerate(["a", "b", "c"]):
    ...     m.learn_one(Interaction("u", t, i, history=("a", "b", "c")[:i], session_position=i))
    >>> m.candidates(Interaction("v", history=("a",)), 5)
    {'b': 0.6666666865348816, 'c': 0.3333333432674469}
    """

    def __init__(
        self,
        steps: int = 10,
        query_window: int = 1,
        query_decay: float = 0.5,
        skip_weight: float = 0.2,
        max_neighbours: int = 100,
        within_session: bool = True,
        vocabulary: Vocabulary | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            window=steps, decay=1.0, backward=0.0, query_window=query_window,
            query_decay=query_decay, skip_weight=skip_weight, max_neighbours=max_neighbours,
            vocabulary=vocabulary, seed=seed,
        )
        self.steps = steps
        self.within_session = within_session

    def learn_one(self, x: Interaction) -> None:
        scale = self.skip_weight if x.skipped else 1.0
        vocab = self._vocab
        track = vocab.add(x.track_id)
        size = len(vocab)
        self.track_weight = grow_rows(self.track_weight, size)
        self.track_weight[track] += scale
        in_session = min(x.session_position if self.within_session else len(x.history),
                         self.steps)
        if scale <= 0 or in_session <= 0:
            return
        prevs = [vocab.add(p) for p in reversed(x.history[-in_session:])]
        self._ensure_rows(len(vocab))
        self._ensure_room(2 * len(prevs) * 2 * self.max_neighbours)
        self._used = int(sr_learn(
            self._start, self._size, self._cap, self._total, self._nbr, self._val,
            self._used, track, np.array(prevs, dtype=np.int64), scale, self.max_neighbours,
        ))

    # -- state ----------------------------------------------------------------------------

    def export_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-able manifest + numeric arrays (see :meth:`import_state`)."""
        from stream.models.stan import _params

        manifest: dict[str, Any] = {"kind": "SequentialRules", "params": _params(self)}
        n = len(self._start)
        arrays: dict[str, np.ndarray] = {
            "start": self._start, "size": self._size, "cap": self._cap,
            "total": self._total, "nbr": self._nbr[: self._used],
            "val": self._val[: self._used], "track_weight": self.track_weight[:n]
            if len(self.track_weight) >= n else grow_rows(self.track_weight, n)[:n],
        }
        if self.vocabulary is None:
            arrays["vocab"] = np.array(self._vocab.ids, dtype=str)
        return manifest, arrays

    @classmethod
    def import_state(
        cls,
        manifest: Mapping[str, Any],
        arrays: Mapping[str, np.ndarray],
        vocabulary: Vocabulary | None = None,
    ) -> SequentialRules:
        """The model :meth:`export_state` described; ``ValueError`` naming the bad field."""
        from stream.models.stan import _array, _require

        if manifest.get("kind") != "SequentialRules":
            raise ValueError(f"kind: expected 'SequentialRules', got {manifest.get('kind')!r}")
        params = dict(_require(manifest, "params", dict))
        try:
            model = cls(**params, vocabulary=vocabulary)
        except TypeError as exc:
            raise ValueError(f"params: {exc}") from None
        if vocabulary is None:
            for t in _array(arrays, "vocab", "U", None).tolist():
                model._vocab.add(t)
        n = len(_array(arrays, "start", "i", None))
        model._start = _array(arrays, "start", "i", (n,)).astype(np.int64)
        model._size = _array(arrays, "size", "i", (n,)).astype(np.int64)
        model._cap = _array(arrays, "cap", "i", (n,)).astype(np.int64)
        model._total = _array(arrays, "total", "f", (n,)).astype(np.float64)
        model.track_weight = _array(arrays, "track_weight", "f", (n,)).astype(np.float64)
        nbr = _array(arrays, "nbr", "i", None)
        val = _array(arrays, "val", "f", nbr.shape)
        used = len(nbr)
        if ((model._size < 0) | (model._size > model._cap) | (model._start < 0)
                | (model._start + model._cap > used)).any():
            raise ValueError("start/size/cap: a rule slice out of bounds")
        if len(nbr) and (nbr.min() < 0 or nbr.max() >= max(n, len(model._vocab))):
            raise ValueError("nbr: a track row outside the vocabulary")
        room = max(1024, used)
        model._nbr = np.concatenate((nbr.astype(np.int32), np.zeros(room, dtype=np.int32)))
        model._val = np.concatenate((val.astype(np.float32), np.zeros(room, dtype=np.float32)))
        model._used = used
        return model
