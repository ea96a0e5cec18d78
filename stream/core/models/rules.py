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

from typing import Any

import numba
import numpy as np

from stream.core.models import _kernels as _k
from stream.core.models._vocab import Vocabulary, grow_rows
from stream.core.models.base import Interaction
from stream.core.models.cooccurrence import SessionCooccurrence

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

    #: the constructor arguments a checkpoint stores (SessionCooccurrence's export_state /
    #: import_state handle the rest: the rules are its neighbour lists)
    _PARAMS: dict[str, Any] = {
        "steps": int, "query_window": int, "query_decay": float, "skip_weight": float,
        "max_neighbours": int, "within_session": bool, "seed": int,
    }

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
