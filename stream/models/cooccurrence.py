"""Session-based next track: time-decayed co-occurrence of tracks within listening sessions.

The session-kNN family is a strong published baseline for music sessions. This is its
item-to-item form: when a listener plays B shortly after A (within ``window`` plays), the
pair (A -> B) gains weight ``decay ** distance``; the reverse pair gains ``backward`` times
that. Counts decay with event time (``half_life_ms``) so the model follows what is played now.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from stream.models.base import FloatArray, Interaction, check_fraction, check_positive

_MAX_EXPONENT = 50.0


class SessionCooccurrence:
    """Item-to-item co-occurrence from each listener's recent plays.

    Scoring a query sums, over its last ``query_window`` tracks (weighted ``query_decay **
    distance``), each track's neighbour weights normalised by the track's total weight and
    by the neighbour's popularity to the power ``pop_penalty`` (0 = plain conditional
    probability, 0.5 = cosine-like). Rows keep at most ``max_neighbours`` entries.

    >>> m = SessionCooccurrence()
    >>> m.learn_one(Interaction("u", "b", 1, history=("a",)))
    >>> m.candidates(Interaction("v", history=("a",)), 5)
    {'b': 1.0}
    """

    def __init__(
        self,
        window: int = 5,
        decay: float = 0.6,
        backward: float = 0.5,
        query_window: int = 5,
        query_decay: float = 0.6,
        pop_penalty: float = 0.0,
        skip_weight: float = 0.2,
        half_life_ms: float | None = None,
        max_neighbours: int = 100,
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
        self.seed = seed
        self._rate = 0.0 if half_life_ms is None else math.log(2) / half_life_ms
        self._ref_ms: int | None = None
        self.rows: dict[str, dict[str, float]] = {}
        self.row_totals: dict[str, float] = {}
        self.track_weight: dict[str, float] = {}

    def learn_one(self, x: Interaction) -> None:
        scale = self._time_scale(x.ts_ms) * (self.skip_weight if x.skipped else 1.0)
        if scale <= 0:
            return
        track = x.track_id
        self.track_weight[track] = self.track_weight.get(track, 0.0) + scale
        w = scale
        for prev in reversed(x.history[-self.window :]):
            if prev != track:
                self._add(prev, track, w)
                if self.backward > 0:
                    self._add(track, prev, w * self.backward)
            w *= self.decay

    def _add(self, src: str, dst: str, w: float) -> None:
        row = self.rows.get(src)
        if row is None:
            row = self.rows[src] = {}
        row[dst] = row.get(dst, 0.0) + w
        self.row_totals[src] = self.row_totals.get(src, 0.0) + w
        if len(row) > 2 * self.max_neighbours:
            keep = sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[: self.max_neighbours]
            self.rows[src] = dict(keep)

    def _time_scale(self, ts_ms: int) -> float:
        if self._rate == 0.0:
            return 1.0
        if self._ref_ms is None:
            self._ref_ms = ts_ms
        exponent = (ts_ms - self._ref_ms) * self._rate
        if exponent > _MAX_EXPONENT:
            shift = math.exp(-exponent)
            for row in self.rows.values():
                for key in row:
                    row[key] *= shift
            self.row_totals = {k: v * shift for k, v in self.row_totals.items()}
            self.track_weight = {k: v * shift for k, v in self.track_weight.items()}
            self._ref_ms = ts_ms
            exponent = 0.0
        return math.exp(max(exponent, -_MAX_EXPONENT))

    def candidates(
        self, x: Interaction, n: int, exclude: frozenset[str] | set[str] = frozenset()
    ) -> dict[str, float]:
        """Up to ``n`` neighbours of the query's recent tracks, best first."""
        scores = self._scores(x.history, exclude)
        if len(scores) > n:
            top = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
            return dict(top)
        return dict(sorted(scores.items(), key=lambda kv: (-kv[1], kv[0])))

    def explain(self, x: Interaction, track_id: str) -> str | None:
        """The recent track that contributes most to ``track_id``'s score (for reasons)."""
        best, best_s = None, 0.0
        w = 1.0
        for prev in reversed(x.history[-self.query_window :]):
            row = self.rows.get(prev)
            if row is not None and track_id in row:
                s = w * row[track_id] / self.row_totals[prev]
                if s > best_s:
                    best, best_s = prev, s
            w *= self.query_decay
        return best

    def _scores(self, history: Sequence[str], exclude: frozenset[str] | set[str]) -> dict[str, float]:
        scores: dict[str, float] = {}
        w = 1.0
        seen_anchor: set[str] = set()
        for prev in reversed(history[-self.query_window :]):
            row = self.rows.get(prev)
            if row is not None and prev not in seen_anchor:
                seen_anchor.add(prev)
                f = w / self.row_totals[prev]
                get = scores.get
                for track, c in row.items():
                    scores[track] = get(track, 0.0) + f * c
            w *= self.query_decay
        for track in exclude & scores.keys() if exclude else ():
            del scores[track]
        for prev in seen_anchor:
            scores.pop(prev, None)
        if self.pop_penalty > 0 and scores:
            tw = self.track_weight
            p = self.pop_penalty
            scores = {t: s / (tw.get(t, 1.0) ** p) for t, s in scores.items()}
        return scores

    def predict_one(self, x: Interaction) -> float:
        if not x.track_id:
            return 0.0
        return self._scores(x.history, frozenset()).get(x.track_id, 0.0)

    def score_many(self, x: Interaction, track_ids: Sequence[str]) -> FloatArray:
        scores = self._scores(x.history, frozenset())
        return np.fromiter((scores.get(t, 0.0) for t in track_ids), dtype=np.float64,
                           count=len(track_ids))
