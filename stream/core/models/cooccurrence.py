"""Session-based next track: time-decayed co-occurrence of tracks within listening sessions.

The session-kNN family is a strong published baseline for music sessions. This is its
item-to-item form: when a listener plays B shortly after A (within ``window`` plays), the
pair (A -> B) gains weight ``decay ** distance``; the reverse pair gains ``backward`` times
that. Counts can decay with event time (``half_life_ms``) so the model follows what is
played now. All neighbour lists live in one arena of flat arrays, learned and queried by
compiled kernels (:mod:`stream.core.models._kernels`); a query touches only the anchors' lists,
never the whole catalogue.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt

from stream.core.models import _kernels as _k
from stream.core.models._state import get_array, get_field
from stream.core.models._vocab import (
    EvictionPlan,
    EvictionSteps,
    IntArray,
    Vocabulary,
    VocabularyModel,
    drain,
    grow_rows,
    top_rows,
)
from stream.core.models.base import FloatArray, Interaction, check_fraction, check_positive
from stream.core.shards import MASK as SHARD_MASK

_MAX_EXPONENT = 50.0
Float32Array = npt.NDArray[np.float32]


class SessionCooccurrence(VocabularyModel):
    """Item-to-item co-occurrence from each listener's recent plays.

    Scoring a query sums, over its last ``query_window`` distinct tracks (weighted
    ``query_decay ** distance``), each track's neighbour weights divided by the track's row
    total (a conditional probability), then divides by the neighbour's own weight to the
    power ``pop_penalty`` (0 = none, 0.5 = cosine-like). Rows keep at most
    ``max_neighbours`` neighbours (heaviest first; pruned once they reach twice that).

    >>> m = SessionCooccurrence()
    >>> m.learn_one(Interaction("u", "b", 1, history=("a",)))
    >>> m.candidates(Interaction("v", history=("a",)), 5)
    {'b': 1.0}
    """

    def __init__(
        self,
        window: int = 10,
        decay: float = 0.8,
        backward: float = 1.0,
        query_window: int = 10,
        query_decay: float = 0.8,
        pop_penalty: float = 0.0,
        skip_weight: float = 0.2,
        half_life_ms: float | None = None,
        max_neighbours: int = 100,
        vocabulary: Vocabulary | None = None,
        seed: int = 0,
    ) -> None:
        if window < 1 or query_window < 1:
            raise ValueError("window and query_window must be >= 1")
        check_fraction("decay", decay)
        check_fraction("query_decay", query_decay)
        check_fraction("backward", backward, allow_zero=True)
        check_fraction("skip_weight", skip_weight, allow_zero=True)
        check_positive("pop_penalty", pop_penalty, allow_zero=True)
        if half_life_ms is not None:
            check_positive("half_life_ms", half_life_ms)
        if max_neighbours < 1:
            raise ValueError(f"max_neighbours must be >= 1, got {max_neighbours!r}")
        self.window = window
        self.decay = decay
        self.backward = backward
        self.query_window = query_window
        self.query_decay = query_decay
        self.pop_penalty = pop_penalty
        self.skip_weight = skip_weight
        self.half_life_ms = half_life_ms
        self.max_neighbours = max_neighbours
        self.vocabulary = vocabulary
        self.seed = seed
        self._rate = 0.0 if half_life_ms is None else math.log(2) / half_life_ms
        self._ref_ms: int | None = None
        self._vocab = vocabulary if vocabulary is not None else Vocabulary()
        self.track_weight: FloatArray = np.zeros(0)
        # neighbour lists: one arena (see stream.core.models._kernels), indexed by vocabulary row
        self._start: IntArray = np.zeros(0, dtype=np.int64)
        self._size: IntArray = np.zeros(0, dtype=np.int64)
        self._cap: IntArray = np.zeros(0, dtype=np.int64)
        self._total: FloatArray = np.zeros(0)
        self._nbr: npt.NDArray[np.int32] = np.zeros(1024, dtype=np.int32)
        self._val: Float32Array = np.zeros(1024, dtype=np.float32)  # P3: item memory
        self._used = 0
        self._live = 0  # room held by rows (the rest of [0, _used) is holes left by moves)
        self._scratch = _Scratch()

    # -- storage --------------------------------------------------------------------------

    def _ensure_rows(self, n: int) -> None:
        if n > len(self._start):
            self._start = grow_rows(self._start, n)
            self._size = grow_rows(self._size, n)
            self._cap = grow_rows(self._cap, n)
            self._total = grow_rows(self._total, n)

    def _ensure_room(self, needed: int) -> None:
        """At least ``needed`` free arena slots; compacts when holes dominate, else grows."""
        if self._used + needed <= len(self._nbr):
            return
        live = int(self._cap[: len(self._start)].sum())
        length = len(self._nbr)
        if live + needed > length // 2:
            length = max(2 * length, 2 * (live + needed))
        nbr = np.zeros(length, dtype=np.int32)
        val = np.zeros(length, dtype=np.float32)
        self._used = int(
            _k.compact_arena(self._start, self._size, self._cap, self._nbr, self._val,
                             len(self._start), nbr, val)
        )
        self._nbr, self._val = nbr, val

    @property
    def n_rows(self) -> int:
        """Tracks that have a neighbour list."""
        return int(np.count_nonzero(self._cap))

    def neighbours(self, row: int) -> tuple[npt.NDArray[np.int32], Float32Array]:
        """Row ``row``'s neighbour rows and weights (views; empty when it has none)."""
        if row >= len(self._start) or self._cap[row] == 0:
            return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32)
        s, n = int(self._start[row]), int(self._size[row])
        return self._nbr[s : s + n], self._val[s : s + n]

    def rows_with_neighbours(self) -> IntArray:
        out: IntArray = np.flatnonzero(self._cap)
        return out

    def memory_bytes(self) -> int:
        """Bytes held by the arrays of this model (arena, row index, track weights)."""
        arrays = (self._start, self._size, self._cap, self._total, self._nbr, self._val,
                  self.track_weight)
        return sum(a.nbytes for a in arrays)

    # -- learning -------------------------------------------------------------------------

    def learn_one(self, x: Interaction) -> None:
        scale = self._time_scale(x.ts_ms) * (self.skip_weight if x.skipped else 1.0)
        if scale <= 0:
            return
        vocab = self._vocab
        shards = vocab.index.shards  # tracks are nearly always known: look up first
        track = shards[hash(x.track_id) & SHARD_MASK].get(x.track_id)
        if track is None:
            track = vocab.add(x.track_id)
        window = x.history[-self.window :]
        prevs = [shards[hash(p) & SHARD_MASK].get(p) for p in reversed(window)]
        if None in prevs:
            prevs = [vocab.add(p) for p in reversed(window)]
        size = len(vocab)
        weights = self.track_weight
        if size > len(weights):
            weights = self.track_weight = grow_rows(weights, size)
        weights[track] += scale
        if not prevs:
            return
        if size > len(self._start):
            self._ensure_rows(size)
        # worst case: every touched row moves once, to a slice of 2 * max_neighbours
        needed = 2 * len(prevs) * 2 * self.max_neighbours
        if self._used + needed > len(self._nbr):
            self._ensure_room(needed)
        self._used = int(
            _k.cooc_learn(
                self._start, self._size, self._cap, self._total, self._nbr, self._val,
                self._used, track, np.array(prevs, dtype=np.int64), scale, self.decay,
                self.backward, self.max_neighbours,
            )
        )

    def _time_scale(self, ts_ms: int) -> float:
        if self._rate == 0.0:
            return 1.0
        if self._ref_ms is None:
            self._ref_ms = ts_ms
        exponent = (ts_ms - self._ref_ms) * self._rate
        if exponent > _MAX_EXPONENT:
            shift = math.exp(-exponent)
            self._val[: self._used] *= shift
            self._total *= shift
            self.track_weight *= shift
            self._ref_ms = ts_ms
            exponent = 0.0
        return math.exp(max(exponent, -_MAX_EXPONENT))

    # -- scoring --------------------------------------------------------------------------

    def anchors(
        self, history: Sequence[str], window: int | None = None, decay: float | None = None
    ) -> list[tuple[int, float]]:
        """(row, weight) of the distinct recent tracks that seed a query, newest first
        (the last ``window`` tracks, weight ``decay`` ** distance; the model's query
        window and decay when not given)."""
        out: list[tuple[int, float]] = []
        seen: set[int] = set()
        w = 1.0
        index = self._vocab.index
        cap = self._cap
        n = len(cap)
        q_decay = self.query_decay if decay is None else decay
        for prev_id in reversed(history[-(self.query_window if window is None else window) :]):
            prev = index.get(prev_id)
            if prev is not None and prev < n and prev not in seen and cap[prev]:
                seen.add(prev)
                out.append((prev, w))
            w *= q_decay
        return out

    def arena(self) -> tuple[IntArray, IntArray, IntArray, FloatArray, Any, Any]:
        """The neighbour-list arrays (``start``, ``size``, ``cap``, ``total``, ``nbr``,
        ``val``) for a compiled query (see stream.core.models._kernels.rank_query)."""
        return self._start, self._size, self._cap, self._total, self._nbr, self._val

    def acquire_scratch(self, size: int) -> _Scratch:
        """:meth:`scratch` without the context manager (the per-query hot path): pair it
        with :meth:`release_scratch`, and ``clear()`` the buffers if the kernel raised."""
        sc = self._scratch
        if sc.busy:
            sc = _Scratch()
        sc.ensure(size)
        sc.busy = True
        return sc

    @staticmethod
    def release_scratch(sc: _Scratch) -> None:
        sc.busy = False

    @contextlib.contextmanager
    def scratch(self, size: int) -> Iterator[_Scratch]:
        """Query scratch buffers for ``size`` tracks, all zero/-1; the caller's kernel
        leaves them so. If it raises, they are cleared here. (A nested query, while
        another one holds them, gets fresh buffers.)"""
        sc = self.acquire_scratch(size)
        try:
            yield sc
        except BaseException:
            sc.clear()
            raise
        finally:
            self.release_scratch(sc)

    def accumulate(self, anchors: list[tuple[int, float]]) -> Touched:
        """Sparse scores of the tracks the ``anchors`` lead to, in scratch buffers reused
        across queries. Use as a context manager: the scratch is cleared on exit. (A nested
        call, while another accumulation is open, gets fresh buffers.)"""
        size = len(self._vocab)
        sc = self._scratch
        if sc.busy:
            sc = _Scratch()
        sc.ensure(size)
        sc.busy = True
        if not anchors:
            return Touched(self, sc, 0, anchors)
        rows = np.array([a for a, _ in anchors], dtype=np.int64)
        weights = np.array([w for _, w in anchors])
        try:
            n = int(
                _k.cooc_accumulate(
                    self._start, self._size, self._total, self._nbr, self._val, rows,
                    weights, sc.acc, sc.best, sc.anchor, sc.touched,
                )
            )
        except BaseException:
            sc.clear()  # which rows it touched is unknown: clear everything
            raise
        if self.pop_penalty > 0 and n:
            tw = grow_rows(self.track_weight, size)
            t = sc.touched[:n]
            sc.acc[t] /= np.maximum(tw[t], 1e-12) ** self.pop_penalty
        sc.acc[rows] = 0.0  # the query's own recent tracks score 0
        return Touched(self, sc, n, anchors)

    def score_all(
        self, x: Interaction, anchors: list[tuple[int, float]] | None = None
    ) -> FloatArray:
        """Scores of every known track after ``x.history`` (vocabulary rows; 0 = unrelated).
        The query's own recent tracks score 0. Pass ``anchors`` (from :meth:`anchors`) when
        they are already known."""
        anchors = self.anchors(x.history) if anchors is None else anchors
        with self.accumulate(anchors) as touched:
            out = touched.scratch.acc[: len(self._vocab)].copy()
        return out

    def candidates(
        self, x: Interaction, n: int, exclude: Collection[str] = frozenset()
    ) -> dict[str, float]:
        """Up to ``n`` neighbours of the query's recent tracks not in ``exclude``, best first."""
        scores = self.score_all(x)
        scores[scores <= 0] = -np.inf
        scores[self._vocab.known_rows(exclude)] = -np.inf
        ids = self._vocab.ids
        return {ids[r]: float(scores[r]) for r in top_rows(scores, n).tolist()}

    def evict_rows(self, plan: EvictionPlan) -> None:
        """Apply a catalogue eviction (see :class:`~stream.core.models._vocab.EvictionPlan`;
        called before the vocabulary applies it). Movers' lists move into the holes (the
        evicted rows' slices become arena holes, reclaimed by the next compaction), then one
        compiled pass renumbers every list and drops evicted neighbours (the row totals
        keep their mass, as when pruning)."""
        drain(self.evict_steps(plan))

    def evict_steps(self, plan: EvictionPlan) -> EvictionSteps[None]:
        """:meth:`evict_rows` in steps (:data:`~stream.core.models._vocab.EvictionSteps`):
        the row moves, then the compiled renumbering pass (GIL released) as a callable."""
        n, keep = len(plan.remap), plan.keep
        self.track_weight = grow_rows(self.track_weight, n)
        yield None
        self._ensure_rows(n)
        yield None
        for arr in (self.track_weight, self._start, self._size, self._cap, self._total):
            arr[plan.holes] = arr[plan.movers]
            arr[keep:n] = 0
            yield None
        # int32 like the arena's neighbour rows: half the cache footprint of the lookups
        yield partial(_k.cooc_renumber, self._start, self._size, self._cap, self._nbr,
                      self._val, keep, plan.remap.astype(np.int32))

    def predict_one(self, x: Interaction) -> float:
        """Score of ``x.track_id`` after ``x.history`` (one lookup per anchor)."""
        target = self._vocab.index.get(x.track_id)
        if target is None:
            return 0.0
        anchors = self.anchors(x.history)
        if any(prev == target for prev, _ in anchors):
            return 0.0
        total = 0.0
        for prev, w in anchors:
            idx, val = self.neighbours(prev)
            hit = np.flatnonzero(idx == target)
            if len(hit):
                total += w * float(val[hit[0]]) / float(self._total[prev])
        if self.pop_penalty > 0 and total > 0:
            total /= max(float(self.track_weight[target]), 1e-12) ** self.pop_penalty
        return total

    def score_many(self, x: Interaction, track_ids: Sequence[str]) -> FloatArray:
        rows = self._vocab.rows(track_ids)
        scores = self.score_all(x)
        if not len(scores):
            return np.zeros(len(rows))
        return np.where(rows >= 0, scores[np.maximum(rows, 0)], 0.0)

    # -- checkpoints ----------------------------------------------------------------------

    _PARAMS: dict[str, Any] = {
        "window": int, "decay": float, "backward": float, "query_window": int,
        "query_decay": float, "pop_penalty": float, "skip_weight": float,
        "half_life_ms": (float, type(None)), "max_neighbours": int, "seed": int,
    }
    _WHERE = "cooccurrence"

    def _export_fields(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Track weights and the neighbour lists, compacted (each row's neighbours in
        order, then their weights; no arena holes)."""
        n_rows = len(self._start)
        rows = np.flatnonzero(self._cap[:n_rows]).astype(np.int64)
        sizes = self._size[rows].astype(np.int64)
        starts = self._start[rows]
        # every live slot, row by row: positions start[r] .. start[r] + size[r] - 1
        ends = np.cumsum(sizes)
        offsets = np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
        if len(offsets):
            offsets += np.repeat(starts - (ends - sizes), sizes)
        arrays: dict[str, np.ndarray] = {
            "track_weight": self.track_weight[: len(self._vocab)].copy(),
            "rows": rows,
            "row_size": sizes,
            "row_cap": self._cap[rows].astype(np.int64),
            "row_total": self._total[rows].astype(np.float64),
            "nbr": self._nbr[offsets].astype(np.int32),
            "val": self._val[offsets].astype(np.float32),
        }
        return {"ref_ms": self._ref_ms}, arrays

    def _import_fields(
        self, manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray], where: str
    ) -> None:
        """Neighbour rows must be known tracks, since the compiled kernels index with them
        unchecked."""
        array = partial(get_array, arrays, where=where)
        n = len(self._vocab)
        self._ref_ms = get_field(manifest, "ref_ms", int, where=where, optional=True)
        weight = array("track_weight", np.float64, ndim=1, finite=True, lo=0.0)
        if len(weight) > n:
            raise ValueError(f"{where}.track_weight: {len(weight)} rows, the vocabulary has {n}")
        rows = array("rows", np.int64, ndim=1, lo=0, hi=n - 1)
        m = len(rows)
        if m and bool(np.any(np.diff(rows) <= 0)):
            raise ValueError(f"{where}.rows: not strictly ascending")
        limit = 2 * self.max_neighbours
        sizes = array("row_size", np.int64, shape=(m,), lo=0, hi=limit)
        caps = array("row_cap", np.int64, shape=(m,), lo=1, hi=max(limit, _k.FIRST_CAP))
        if bool(np.any(sizes > caps)):
            raise ValueError(f"{where}.row_size: a row holds more than its row_cap")
        totals = array("row_total", np.float64, shape=(m,), finite=True, lo=0.0)
        live = int(sizes.sum())
        nbr = array("nbr", np.int32, shape=(live,), lo=0, hi=n - 1)
        val = array("val", np.float32, shape=(live,), finite=True, lo=0.0)
        # the arena, rebuilt: each row's slice at the next free position, with its room
        n_rows = max(n, int(rows[-1]) + 1 if m else 0)
        self._ensure_rows(n_rows)
        self.track_weight = weight.copy()
        used = int(caps.sum())
        self._nbr = np.zeros(max(1024, used + used // 4), dtype=np.int32)
        self._val = np.zeros(len(self._nbr), dtype=np.float32)
        starts = np.concatenate(([0], np.cumsum(caps)[:-1])).astype(np.int64) if m else rows
        self._start[rows] = starts
        self._size[rows] = sizes
        self._cap[rows] = caps
        self._total[rows] = totals
        if live:
            ends = np.cumsum(sizes)
            dest = np.arange(live, dtype=np.int64) + np.repeat(starts - (ends - sizes), sizes)
            self._nbr[dest] = nbr
            self._val[dest] = val
        self._used = used


class _Scratch:
    """Dense per-track buffers reused across queries (all-zero / -1 between queries), so a
    query costs what it touches, not the catalogue size."""

    __slots__ = ("acc", "best", "anchor", "touched", "busy")

    def __init__(self) -> None:
        self.acc: FloatArray = np.zeros(0)
        self.best: FloatArray = np.zeros(0)
        self.anchor: IntArray = np.zeros(0, dtype=np.int64)
        self.touched: IntArray = np.zeros(0, dtype=np.int64)
        self.busy = False  # an accumulation is open on these buffers

    def clear(self) -> None:
        self.acc[:] = 0.0
        self.best[:] = 0.0
        self.anchor[:] = -1
        self.busy = False

    def ensure(self, size: int) -> None:
        if size > len(self.acc):
            cap = max(size, 2 * len(self.acc), 64)
            self.acc = np.zeros(cap)
            self.best = np.zeros(cap)
            self.anchor = np.full(cap, -1, dtype=np.int64)
            self.touched = np.zeros(cap, dtype=np.int64)


class Touched:
    """The result of :meth:`SessionCooccurrence.accumulate`: ``scratch.acc[row]`` is each
    track's score, ``scratch.anchor[row]`` its strongest anchor (-1: not touched), and
    ``scratch.touched[:n]`` the touched rows. Valid inside its ``with`` block only."""

    __slots__ = ("model", "scratch", "n", "anchors")

    def __init__(
        self,
        model: SessionCooccurrence,
        scratch: _Scratch,
        n: int,
        anchors: list[tuple[int, float]],
    ) -> None:
        self.model = model
        self.scratch = scratch
        self.n = n
        self.anchors = anchors

    def rows(self) -> IntArray:
        return self.scratch.touched[: self.n]

    def __enter__(self) -> Touched:
        return self

    def __exit__(self, *exc: object) -> None:
        sc = self.scratch
        _k.reset_touched(sc.acc, sc.best, sc.anchor, sc.touched, self.n)
        for row, _ in self.anchors:  # anchors were zeroed, maybe without being touched
            sc.acc[row] = 0.0
        sc.busy = False
