"""Session-based next track: time-decayed co-occurrence of tracks within listening sessions.

The session-kNN family is a strong published baseline for music sessions. This is its
item-to-item form: when a listener plays B shortly after A (within ``window`` plays), the
pair (A -> B) gains weight ``decay ** distance``; the reverse pair gains ``backward`` times
that. Counts can decay with event time (``half_life_ms``) so the model follows what is
played now. Each row is a pair of numpy arrays, so scoring a query is a handful of
vectorised operations however long the rows are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import cast

import numpy as np

from stream.models._vocab import IntArray, Vocabulary, grow_rows, top_rows
from stream.models.base import FloatArray, Interaction, check_fraction, check_positive

_MAX_EXPONENT = 50.0


class _Row:
    """One track's neighbours: row number -> weight, as growable parallel arrays."""

    __slots__ = ("pos", "idx", "val", "size", "total")

    def __init__(self) -> None:
        self.pos: dict[int, int] = {}
        self.idx: IntArray = np.zeros(8, dtype=np.int64)
        self.val: FloatArray = np.zeros(8)
        self.size = 0
        self.total = 0.0

    def add(self, dst: int, w: float, cap: int) -> None:
        p = self.pos.get(dst)
        if p is None:
            if self.size >= 2 * cap:
                self.prune(cap)
            p = self.size
            if p >= len(self.idx):
                self.idx = np.concatenate([self.idx, np.zeros(p, dtype=np.int64)])
                self.val = np.concatenate([self.val, np.zeros(p)])
            self.idx[p] = dst
            self.pos[dst] = p
            self.size = p + 1
        self.val[p] += w
        self.total += w

    def prune(self, cap: int) -> None:
        """Keep the ``cap`` heaviest neighbours (the row total keeps the dropped mass)."""
        keep = top_rows(self.val[: self.size], cap)
        keep.sort()
        n = len(keep)
        self.idx[:n] = self.idx[keep]
        self.val[:n] = self.val[keep]
        self.val[n:] = 0.0
        self.size = n
        self.pos = {int(d): i for i, d in enumerate(self.idx[:n].tolist())}


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
        self.rows: dict[int, _Row] = {}
        self.track_weight: FloatArray = np.zeros(0)

    # -- learning -------------------------------------------------------------------------

    def learn_one(self, x: Interaction) -> None:
        scale = self._time_scale(x.ts_ms) * (self.skip_weight if x.skipped else 1.0)
        if scale <= 0:
            return
        vocab = self._vocab
        track = vocab.add(x.track_id)
        self.track_weight = grow_rows(self.track_weight, track + 1)
        self.track_weight[track] += scale
        w = scale
        cap = self.max_neighbours
        rows = self.rows
        for prev_id in reversed(x.history[-self.window :]):
            prev = vocab.add(prev_id)
            if prev != track:
                row = rows.get(prev)
                if row is None:
                    row = rows[prev] = _Row()
                row.add(track, w, cap)
                if self.backward > 0:
                    back = rows.get(track)
                    if back is None:
                        back = rows[track] = _Row()
                    back.add(prev, w * self.backward, cap)
            w *= self.decay

    def _time_scale(self, ts_ms: int) -> float:
        if self._rate == 0.0:
            return 1.0
        if self._ref_ms is None:
            self._ref_ms = ts_ms
        exponent = (ts_ms - self._ref_ms) * self._rate
        if exponent > _MAX_EXPONENT:
            shift = math.exp(-exponent)
            for row in self.rows.values():
                row.val *= shift
                row.total *= shift
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
        for prev_id in reversed(history[-self.query_window :]):
            prev = index.get(prev_id)
            if prev is not None and prev not in seen and prev in self.rows:
                seen.add(prev)
                out.append((prev, w))
            w *= self.query_decay
        return out

    def score_all(
        self, x: Interaction, anchors: list[tuple[int, float]] | None = None
    ) -> FloatArray:
        """Scores of every known track after ``x.history`` (vocabulary rows; 0 = unrelated).
        The query's own recent tracks score 0. Pass ``anchors`` (from :meth:`anchors`) when
        they are already known."""
        size = len(self._vocab)
        anchors = self.anchors(x.history) if anchors is None else anchors
        if not anchors:
            return np.zeros(size)
        idx: list[IntArray] = []
        val: list[FloatArray] = []
        scales: list[float] = []
        sizes: list[int] = []
        rows = self.rows
        for prev, w in anchors:
            row = rows[prev]
            n = row.size
            idx.append(row.idx[:n])
            val.append(row.val[:n])
            scales.append(w / row.total)
            sizes.append(n)
        # One bincount instead of one scaled fancy-index += per anchor: the same products,
        # added in the same order (anchor by anchor, from zero), so the sums are
        # bit-identical, in 5 numpy calls instead of ~4 per anchor.
        weights = np.concatenate(val) * np.repeat(scales, sizes)
        # (With weights, bincount returns float64; numpy's stubs only know the int case.)
        out = cast(
            FloatArray, np.bincount(np.concatenate(idx), weights=weights, minlength=size)
        )
        if self.pop_penalty > 0:
            tw = grow_rows(self.track_weight, size)[:size]
            out /= np.maximum(tw, 1e-12) ** self.pop_penalty
        out[[prev for prev, _ in anchors]] = 0.0
        return out

    def explain(
        self, x: Interaction, track_id: str, anchors: list[tuple[int, float]] | None = None
    ) -> str | None:
        """The recent track that contributes most to ``track_id``'s score (for reasons).
        Pass ``anchors`` (from :meth:`anchors`) when explaining many tracks of one query."""
        target = self._vocab.index.get(track_id)
        if target is None:
            return None
        best, best_s = None, 0.0
        for prev, w in self.anchors(x.history) if anchors is None else anchors:
            row = self.rows[prev]
            p = row.pos.get(target)
            if p is not None:
                s = w * row.val.item(p) / row.total
                if s > best_s:
                    best, best_s = prev, s
        return None if best is None else self._vocab.ids[best]

    def explainer(self, anchors: list[tuple[int, float]]) -> Callable[[str], str | None]:
        """:meth:`explain` for one query's ``anchors``, with the per-anchor lookups done once
        (the ranker asks it for each of the top K tracks)."""
        rows = self.rows
        seeds = [
            (prev, w, rows[prev].pos.get, rows[prev].val.item, rows[prev].total)
            for prev, w in anchors
        ]
        index, ids = self._vocab.index, self._vocab.ids

        def explain(track_id: str) -> str | None:
            target = index.get(track_id)
            if target is None:
                return None
            best, best_s = None, 0.0
            for prev, w, position, value, total in seeds:
                p = position(target)
                if p is not None:
                    s = w * value(p) / total
                    if s > best_s:
                        best, best_s = prev, s
            return None if best is None else ids[best]

        return explain

    def candidates(
        self, x: Interaction, n: int, exclude: Collection[str] = frozenset()
    ) -> dict[str, float]:
        """Up to ``n`` neighbours of the query's recent tracks not in ``exclude``, best first."""
        scores = self.score_all(x)
        scores[scores <= 0] = -np.inf
        scores[self._vocab.known_rows(exclude)] = -np.inf
        ids = self._vocab.ids
        return {ids[r]: float(scores[r]) for r in top_rows(scores, n).tolist()}

    def remap_rows(self, kept: IntArray, remap: IntArray) -> None:
        """Keep the rows ``kept`` (ascending); ``remap[old] -> new`` or -1 if evicted.
        Neighbours that were evicted leave their rows (the row totals keep their mass, as
        when pruning)."""
        n = len(self.track_weight)
        self.track_weight = self.track_weight[kept[kept < n]].copy()
        rows: dict[int, _Row] = {}
        for src, row in self.rows.items():
            new_src = int(remap[src]) if src < len(remap) else -1
            if new_src < 0:
                continue
            idx = row.idx[: row.size]
            new_idx = np.where(idx < len(remap), remap[np.minimum(idx, len(remap) - 1)], -1)
            keep = new_idx >= 0
            m = int(keep.sum())
            fresh = _Row()
            fresh.idx = np.zeros(max(8, m), dtype=np.int64)
            fresh.val = np.zeros(max(8, m))
            fresh.idx[:m] = new_idx[keep]
            fresh.val[:m] = row.val[: row.size][keep]
            fresh.size = m
            fresh.total = row.total
            fresh.pos = {int(d): i for i, d in enumerate(fresh.idx[:m].tolist())}
            rows[new_src] = fresh
        self.rows = rows

    def predict_one(self, x: Interaction) -> float:
        """Score of ``x.track_id`` after ``x.history`` (one lookup per anchor)."""
        target = self._vocab.index.get(x.track_id)
        if target is None:
            return 0.0
        total = 0.0
        anchors = self.anchors(x.history)
        for prev, w in anchors:
            row = self.rows[prev]
            p = row.pos.get(target)
            if p is not None:
                total += w * row.val.item(p) / row.total
        if any(prev == target for prev, _ in anchors):
            return 0.0
        if self.pop_penalty > 0 and total > 0:
            total /= max(float(self.track_weight[target]), 1e-12) ** self.pop_penalty
        return total

    def score_many(self, x: Interaction, track_ids: Sequence[str]) -> FloatArray:
        rows = self._vocab.rows(track_ids)
        scores = self.score_all(x)
        if not len(scores):
            return np.zeros(len(rows))
        return np.where(rows >= 0, scores[np.maximum(rows, 0)], 0.0)
