"""Track id <-> dense row number, shared by the models of one recommender so their score
vectors line up and can be blended with numpy."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self, TypeVar

import numpy as np
import numpy.typing as npt

from stream.core.models._state import (
    StateModel,
    decode_strings,
    encode_strings,
    get_field,
    prefixed,
    under,
    unique_ids,
)
from stream.core.shards import MASK as SHARD_MASK
from stream.core.shards import ShardedDict

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

#: ids per C-level dictionary loop in :meth:`Vocabulary.fill_holes` (well under 1 ms each)
_SLICE = 512

_Result = TypeVar("_Result")

#: A catalogue eviction in steps (``Recommender.eviction_steps``): a generator that yields
#: ``None`` after each bounded slice of work (about a millisecond or less: the caller may let
#: other work run before it asks for the next), or a callable that does compiled work which
#: releases the GIL (the caller may run it in another thread, and must let it finish before
#: it asks for the next step). Its return value is the step's result. Nothing else may use
#: the models between two steps: they are half-changed.
EvictionSteps = Generator[Callable[[], object] | None, None, _Result]


def drain(steps: EvictionSteps[_Result]) -> _Result:
    """Run every step of ``steps`` here and now (compiled ones too); returns the result."""
    while True:
        try:
            step = next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        if step is not None:
            step()


class Vocabulary:
    """Track ids <-> dense row numbers, growing as new ids arrive; shrinks only through
    :meth:`compact` (catalogue eviction, see ``Recommender.evict_tracks``)."""

    __slots__ = ("index", "ids", "generation")

    def __init__(self) -> None:
        #: (in shards: no single hash-table growth rehashes every track, stream.core.shards)
        self.index: ShardedDict[str, int] = ShardedDict()
        self.ids: list[str] = []
        self.generation = 0  # bumped when rows are renumbered (compact)

    def export_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The ids in row order (see :mod:`stream.core.models._state`) and the generation."""
        blob, ends = encode_strings(self.ids)
        return {"generation": self.generation}, {"ids.bytes": blob, "ids.ends": ends}

    @classmethod
    def import_state(
        cls, manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray], *, where: str
    ) -> Vocabulary:
        """A vocabulary from :meth:`export_state`; ids are checked (UTF-8, length, unique)
        and shared (:data:`stream.core.ids.IDS`): the plays parsed from now on, and the
        listeners restored from the changelog, then point at the catalogue's strings instead
        of holding copies."""
        vocab = cls()
        vocab.generation = get_field(manifest, "generation", int, where=where, lo=0)
        if "ids.bytes" not in arrays or "ids.ends" not in arrays:
            raise ValueError(f"{where}.ids: missing array")
        ids = unique_ids(f"{where}.ids", decode_strings(
            f"{where}.ids", arrays["ids.bytes"], arrays["ids.ends"]))
        vocab.ids = ids
        vocab.index = ShardedDict(zip(ids, range(len(ids)), strict=True))
        return vocab

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, key: str) -> int:
        shard = self.index.shards[hash(key) & SHARD_MASK]  # index.get, inlined
        row = shard.get(key)
        if row is None:
            row = len(self.ids)
            shard[key] = row
            self.ids.append(key)
        return row

    def compact(self, kept: IntArray) -> None:
        """Keep only the tracks at rows ``kept`` (ascending), renumbered 0..len(kept)-1, in
        place (the models share this object). Touches every row: eviction uses
        :meth:`fill_holes`, which touches only the rows that change."""
        ids = [self.ids[int(r)] for r in kept]
        self.generation += 1
        self.ids[:] = ids
        self.index.clear()
        self.index.update((key, i) for i, key in enumerate(ids))

    def fill_holes(self, plan: EvictionPlan) -> list[str]:
        """Apply an :class:`EvictionPlan` in place: drop the evicted ids, move each mover
        into a hole, and truncate to ``plan.keep`` rows. Returns the evicted ids. Costs
        O(evicted) dictionary operations (C-level loops), not O(catalogue)."""
        return drain(self.fill_holes_steps(plan))

    def fill_holes_steps(self, plan: EvictionPlan) -> EvictionSteps[list[str]]:
        """:meth:`fill_holes` in steps of ``_SLICE`` ids (:data:`EvictionSteps`): each
        C-level loop below holds the GIL for its whole run, and the worker runs an eviction
        in slices between its event loop's other work (stream.worker.eviction)."""
        ids, index = self.ids, self.index
        evicted: list[str] = []
        for lo in range(0, len(plan.evicted), _SLICE):
            part = list(map(ids.__getitem__, plan.evicted[lo : lo + _SLICE].tolist()))
            deque(map(index.__delitem__, part), maxlen=0)
            evicted += part
            yield None
        for lo in range(0, len(plan.movers), _SLICE):
            part = list(map(ids.__getitem__, plan.movers[lo : lo + _SLICE].tolist()))
            holes = plan.holes[lo : lo + _SLICE].tolist()
            deque(map(ids.__setitem__, holes, part), maxlen=0)
            index.update(zip(part, holes, strict=True))
            yield None
        del ids[plan.keep :]
        self.generation += 1
        return evicted

    def rows(self, keys: Sequence[str] | Collection[str]) -> IntArray:
        """Row numbers for ``keys``; unknown keys map to -1 (nothing is added)."""
        shards = self.index.shards  # index.get, inlined
        return np.fromiter((shards[hash(k) & SHARD_MASK].get(k, -1) for k in keys),
                           dtype=np.int64, count=len(keys))

    def known_rows(self, keys: Collection[str]) -> IntArray:
        """Row numbers of the ``keys`` that are known (unknown ones are dropped)."""
        rows = self.rows(keys)
        out: IntArray = rows[rows >= 0]
        return out


@dataclass(frozen=True, slots=True)
class EvictionPlan:
    """Which rows a catalogue eviction drops and how the survivors are renumbered, so that
    only the rows that change move: ``evicted`` (ascending) leave; each row of ``movers``
    (the survivors at or above ``keep``, ascending) moves into the row of ``holes`` at the
    same position (the evicted rows below ``keep``); every other row keeps its number.
    ``remap[old]`` is the new row of every old row (-1: evicted)."""

    keep: int
    evicted: IntArray
    holes: IntArray
    movers: IntArray
    remap: IntArray

    @classmethod
    def lightest(cls, weights: npt.NDArray[np.float64], keep: int) -> EvictionPlan:
        """Evict all but the ``keep`` heaviest rows of ``weights``; among equal weights at
        the cut the higher rows go. O(rows) (a partition, no sort)."""
        n = len(weights)
        if not 0 <= keep <= n:
            raise ValueError(f"keep must be in [0, {n}], got {keep!r}")
        n_evict = n - keep
        if n_evict == 0:
            evicted = np.zeros(0, dtype=np.int64)
        elif keep == 0:
            evicted = np.arange(n, dtype=np.int64)
        else:
            cut = np.partition(weights, n_evict - 1)[n_evict - 1]
            below = np.flatnonzero(weights < cut)
            ties = np.flatnonzero(weights == cut)
            evicted = np.sort(np.concatenate((below, ties[len(ties) - (n_evict - len(below)) :])))
        holes = evicted[evicted < keep]
        stays_up = np.ones(n_evict, dtype=bool)
        stays_up[evicted[evicted >= keep] - keep] = False
        movers = keep + np.flatnonzero(stays_up)
        remap = np.arange(n, dtype=np.int64)
        remap[evicted] = -1
        remap[movers] = holes
        return cls(keep, evicted.astype(np.int64), holes.astype(np.int64),
                   movers.astype(np.int64), remap)


_Item = TypeVar("_Item", bound=np.generic)


#: rows every per-track array is given at once when it first grows (0: none; see
#: :func:`reserve_rows`)
_RESERVED_ROWS = [0]


def reserve_rows(rows: int) -> None:
    """Give every per-track array (item factors, popularity, co-occurrence index, ...)
    room for ``rows`` tracks the first time it grows, instead of growing by a factor and
    copying: at 300k-500k tracks each copy of the MF item matrix (up to ~64 MB) held the
    event loop ~0.1 s on a quiet machine and 0.9-1.5 s on a loaded one (the junk-ids
    drill's longest stalls). ``np.zeros`` memory is mapped lazily, so rows not yet used
    cost address space, not RSS. The worker reserves its ``max_tracks`` (plus the 10 %
    an eviction round may overshoot). Process-wide; 0 turns it off."""
    _RESERVED_ROWS[0] = max(0, int(rows))


def grow_rows(
    matrix: npt.NDArray[_Item], needed: int, growth: float = 2.0
) -> npt.NDArray[_Item]:
    """``matrix`` with at least ``needed`` rows (capacity grows by ``growth``, or at once
    to the reserved rows when they hold ``needed``: :func:`reserve_rows`; new rows are
    zero)."""
    if needed <= matrix.shape[0]:
        return matrix
    reserved = _RESERVED_ROWS[0]
    capacity = max(needed, int(growth * matrix.shape[0]), 64,
                   reserved if needed <= reserved else 0)
    bigger = np.zeros((capacity, *matrix.shape[1:]), dtype=matrix.dtype)
    bigger[: matrix.shape[0]] = matrix
    return bigger


def top_rows(scores: npt.NDArray[np.float64], n: int) -> IntArray:
    """Rows of the ``n`` highest finite scores, best first; ties by row (deterministic)."""
    size = len(scores)
    if n <= 0 or size == 0:
        return np.zeros(0, dtype=np.int64)
    top = np.argpartition(-scores, n - 1)[:n] if n < size else np.arange(size)
    top = top[np.isfinite(scores[top])]
    out: IntArray = top[np.lexsort((top, -scores[top]))]
    return out


def top_set(scores: npt.NDArray[np.float64], n: int) -> IntArray:
    """The rows :func:`top_rows` returns, in no particular order (skips the final sort, for
    callers that only take the union of several top sets)."""
    size = len(scores)
    if n <= 0 or size == 0:
        return np.zeros(0, dtype=np.int64)
    if n >= size:
        return np.flatnonzero(np.isfinite(scores))
    top = np.argpartition(-scores, n - 1)[:n]
    out: IntArray = top[np.isfinite(scores[top])]
    return out


def export_vocabulary(
    shared: Vocabulary | None, own: Vocabulary, manifest: dict[str, Any],
    arrays: dict[str, np.ndarray],
) -> None:
    """Put a model's own vocabulary into its exported state (a shared one is the
    container's to export: the model records ``None``)."""
    if shared is None:
        m, a = own.export_state()
        manifest["vocabulary"] = m
        arrays.update(prefixed("vocabulary", a))
    else:
        manifest["vocabulary"] = None


def import_vocabulary(
    manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray], where: str,
    shared: Vocabulary | None,
) -> Vocabulary:
    """The ``shared`` vocabulary, if the container passes one, else the model's own from
    its exported state; which of the two it must be is checked."""
    own = get_field(manifest, "vocabulary", dict, where=where, optional=True)
    if shared is not None:
        if own is not None:
            raise ValueError(f"{where}.vocabulary: holds its own, but a shared one was given")
        return shared
    if own is None:
        raise ValueError(f"{where}.vocabulary: missing (the state was exported with a shared "
                         "vocabulary; pass it)")
    return Vocabulary.import_state(own, under("vocabulary", arrays), where=f"{where}.vocabulary")


class VocabularyModel(StateModel):
    """The checkpoint of a model that indexes tracks through a :class:`Vocabulary` (its
    own, or the container's shared one): a :class:`StateModel` whose state ends with its
    vocabulary (``None`` when shared: the container exports that), checked before the
    model is built.
    """

    vocabulary: Vocabulary | None
    _vocab: Vocabulary

    def _with_params(
        self, fields: dict[str, Any], arrays: dict[str, np.ndarray]
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        manifest, arrays = super()._with_params(fields, arrays)
        export_vocabulary(self.vocabulary, self._vocab, manifest, arrays)
        return manifest, arrays

    @classmethod
    def _build(
        cls, manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray], where: str,
        params: dict[str, Any], vocabulary: Vocabulary | None = None,
    ) -> Self:
        """The model with the container's ``vocabulary`` (``import_state(...,
        vocabulary=...)``) when the state was exported with a shared one, else with its
        own, read from the state (checked before the model is made)."""
        vocab = import_vocabulary(manifest, arrays, where, vocabulary)
        model = super()._build(manifest, arrays, where, {**params, "vocabulary": vocabulary})
        model._vocab = vocab
        return model
