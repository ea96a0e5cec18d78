"""Trending tracks: time-decayed play counts."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from stream.models._vocab import Vocabulary, grow_rows
from stream.models.base import FloatArray, Interaction, check_fraction, check_positive

#: Rebase the reference time before exp() gets anywhere near float overflow.
_MAX_EXPONENT = 50.0


class DecayedPopularity:
    """Play counts where each play's weight halves every ``half_life_ms`` of event time.

    Weights are stored relative to a moving reference time, so a play costs O(1): no
    per-step decay of the whole catalogue. A skipped play counts ``skip_weight``.

    >>> pop = DecayedPopularity(half_life_ms=1000)
    >>> for ts, t in [(0, "a"), (0, "a"), (2000, "b")]:
    ...     pop.learn_one(Interaction("u", t, ts))
    >>> sorted(pop.candidates(Interaction("u", ts_ms=2000), 2))
    ['a', 'b']
    >>> round(pop.predict_one(Interaction("u", "b", 2000)), 3)  # 1 of (0.25 * 2 + 1)
    0.667
    """

    def __init__(
        self,
        half_life_ms: float = 7 * 24 * 3600 * 1000,
        skip_weight: float = 0.2,
        refresh_every: int = 64,
        seed: int = 0,
    ) -> None:
        check_positive("half_life_ms", half_life_ms)
        check_fraction("skip_weight", skip_weight, allow_zero=True)
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every!r}")
        self.half_life_ms = half_life_ms
        self.skip_weight = skip_weight
        self.refresh_every = refresh_every
        self.seed = seed
        self._rate = math.log(2) / half_life_ms
        self._ref_ms: int | None = None
        self._vocab = Vocabulary()
        self._weights: FloatArray = np.zeros(0)
        self._total = 0.0
        self._n_learned = 0
        self._ranked: list[int] = []
        self._ranked_at = -1

    def learn_one(self, x: Interaction) -> None:
        if self._ref_ms is None:
            self._ref_ms = x.ts_ms
        exponent = (x.ts_ms - self._ref_ms) * self._rate
        if exponent > _MAX_EXPONENT:
            shift = math.exp(-exponent)
            self._weights *= shift
            self._total *= shift
            self._ref_ms = x.ts_ms
            exponent = 0.0
        row = self._vocab.add(x.track_id)
        self._weights = grow_rows(self._weights, row + 1)
        w = (self.skip_weight if x.skipped else 1.0) * math.exp(max(exponent, -_MAX_EXPONENT))
        self._weights[row] += w
        self._total += w
        self._n_learned += 1

    def predict_one(self, x: Interaction) -> float:
        """Share of recent (decayed) plays that went to ``x.track_id``; 0 if never played."""
        row = self._vocab.index.get(x.track_id)
        if row is None or self._total <= 0:
            return 0.0
        return float(self._weights[row] / self._total)

    def score_many(self, x: Interaction, track_ids: Sequence[str]) -> FloatArray:
        rows = self._vocab.rows(tuple(track_ids))
        out = np.zeros(len(rows))
        known = rows >= 0
        if self._total > 0:
            out[known] = self._weights[rows[known]] / self._total
        return out

    def candidates(
        self, x: Interaction, n: int, exclude: frozenset[str] | set[str] = frozenset()
    ) -> dict[str, float]:
        """The ``n`` most played tracks not in ``exclude``, with their share of plays."""
        if n <= 0 or not self._vocab.ids:
            return {}
        ranked = self._ranking(n + len(exclude))
        ids = self._vocab.ids
        out: dict[str, float] = {}
        total = self._total or 1.0
        for row in ranked:
            track = ids[row]
            if track in exclude:
                continue
            out[track] = float(self._weights[row] / total)
            if len(out) >= n:
                break
        return out

    def _ranking(self, depth: int) -> list[int]:
        """Rows by decreasing weight, at least ``depth`` deep; cached between refreshes."""
        stale = self._n_learned - self._ranked_at >= self.refresh_every
        if stale or len(self._ranked) < min(depth, len(self._vocab)):
            size = len(self._vocab)
            weights = self._weights[:size]
            depth = min(size, max(depth, 256))
            if depth < size:
                top = np.argpartition(-weights, depth - 1)[:depth]
            else:
                top = np.arange(size)
            # Stable tie-break on row (first-seen order) keeps replays reproducible.
            order = np.lexsort((top, -weights[top]))
            self._ranked = top[order].tolist()
            self._ranked_at = self._n_learned
        return self._ranked
