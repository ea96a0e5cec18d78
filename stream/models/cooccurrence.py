"""Session-based next track: time-decayed co-occurrence of tracks within listening sessions.

The session-kNN family is a strong published baseline for music sessions. This is its
item-to-item form: when a listener plays B shortly after A (within ``window`` plays), the
pair (A -> B) gains weight ``decay ** distance``; the reverse pair gains ``backward`` times
that. Counts can decay with event time (``half_life_ms``) so the model follows what is
played now. All neighbour lists live in one arena of flat arrays, learned and queried by
compiled kernels (:mod:`stream.models._kernels`); a query touches only the anchors' lists,
never the whole catalogue.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from stream.models import _kernels as _k
from stream.models._vocab import EvictionPlan, IntArray, Vocabulary, grow_rows, top_rows
from stream.models.base import FloatArray, Interaction, check_fraction, check_positive

_MAX_EXPONENT = 50.0
Float32Array = npt.NDArray[np.float32]


class SessionCooccurrence:
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
        # neighbour lists: one arena (see stream.models._kernels), indexed by vocabulary row
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
        track = vocab.add(x.track_id)
        get = vocab.index.get  # recent tracks are nearly always known: look up first
        prevs = [get(p) for p in reversed(x.history[-self.window :])]
        if None in prevs:
            prevs = [vocab.add(p) for p in reversed(x.history[-self.window :])]
        size = len(vocab)
        self.track_weight = grow_rows(self.track_weight, size)
        self.track_weight[track] += scale
        if not prevs:
            return
        self._ensure_rows(size)
        # worst case: every touched row moves once, to a slice of 2 * max_neighbours
        self._ensure_room(2 * len(prevs) * 2 * self.max_neighbours)
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

    def anchors(self, history: Sequence[str]) -> list[tuple[int, float]]:
        """(row, weight) of the distinct recent tracks that seed a query, newest first."""
        out: list[tuple[int, float]] = []
        seen: set[int] = set()
        w = 1.0
        index = self._vocab.index
        cap = self._cap
        n = len(cap)
        for prev_id in reversed(history[-self.query_window :]):
            prev = index.get(prev_id)
            if prev is not None and prev < n and prev not in seen and cap[prev]:
                seen.add(prev)
                out.append((prev, w))
            w *= self.query_decay
        return out

    def arena(self) -> tuple[IntArray, IntArray, IntArray, FloatArray, Any, Any]:
        """The neighbour-list arrays (``start``, ``size``, ``cap``, ``total``, ``nbr``,
        ``val``) for a compiled query (see stream.models._kernels.rank_query)."""
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
        """Apply a catalogue eviction (see :class:`~stream.models._vocab.EvictionPlan`;
        called before the vocabulary applies it). Movers' lists move into the holes (the
        evicted rows' slices become arena holes, reclaimed by the next compaction), then one
        compiled pass renumbers every list and drops evicted neighbours (the row totals
        keep their mass, as when pruning)."""
        n, keep = len(plan.remap), plan.keep
        self.track_weight = grow_rows(self.track_weight, n)
        self._ensure_rows(n)
        for arr in (self.track_weight, self._start, self._size, self._cap, self._total):
            arr[plan.holes] = arr[plan.movers]
            arr[keep:n] = 0
        # int32 like the arena's neighbour rows: half the cache footprint of the lookups
        _k.cooc_renumber(self._start, self._size, self._cap, self._nbr, self._val, keep,
                         plan.remap.astype(np.int32))

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

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_scratch"] = None  # per-process buffers, rebuilt empty
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._scratch = _Scratch()


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
