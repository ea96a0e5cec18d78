"""Trending tracks: time-decayed play counts."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np

from stream.models._vocab import IntArray, Vocabulary, grow_rows, top_rows
from stream.models.base import FloatArray, Interaction, check_fraction, check_positive

#: Rebase the reference time before exp() gets anywhere near float overflow.
_MAX_EXPONENT = 50.0


class DecayedPopularity:
    """Play counts where each play's weight halves every ``half_life_ms`` of event time.

    Weights are stored relative to a moving reference time, so a play costs O(1): no
    per-step decay of the whole catalogue. A skipped play counts ``skip_weight``. Scores are
    shares of the decayed total, so they do not depend on the query time.

    >>> pop = DecayedPopularity(half_life_ms=1000)
    >>> for ts, t in [(0, "a"), (0, "a"), (2000, "b")]:
    ...     pop.learn_one(Interaction("u", t, ts))
    >>> list(pop.candidates(Interaction("u", ts_ms=2000), 2))
    ['b', 'a']
    >>> round(pop.predict_one(Interaction("u", "b", 2000)), 3)  # 1 of (0.25 * 2 + 1)
    0.667
    """

    def __init__(
        self,
        half_life_ms: float = 7 * 24 * 3600 * 1000,
        skip_weight: float = 0.2,
        vocabulary: Vocabulary | None = None,
        seed: int = 0,
    ) -> None:
        check_positive("half_life_ms", half_life_ms)
        check_fraction("skip_weight", skip_weight, allow_zero=True)
        self.half_life_ms = half_life_ms
        self.skip_weight = skip_weight
        self.vocabulary = vocabulary
        self.seed = seed
        self._rate = math.log(2) / half_life_ms
        self._ref_ms: int | None = None
        self._vocab = vocabulary if vocabulary is not None else Vocabulary()
        self._weights: FloatArray = np.zeros(0)
        self._total = 0.0

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

    def score_all(self) -> FloatArray:
        """Every known track's share of the decayed plays, indexed by vocabulary row."""
        size = len(self._vocab)
        self._weights = grow_rows(self._weights, size)
        out: FloatArray = self._weights[:size] / (self._total or 1.0)
        return out

    def weights(self) -> FloatArray:
        """Decayed weight per vocabulary row (relative to the internal reference time)."""
        return self._weights[: len(self._vocab)]

    def remap_rows(self, kept: IntArray) -> None:
        """Keep the rows ``kept`` (ascending) only; called after the vocabulary compacted."""
        n = len(self._weights)
        self._weights = self._weights[kept[kept < n]].copy()
        self._total = float(self._weights.sum())

    def predict_one(self, x: Interaction) -> float:
        """Share of recent (decayed) plays that went to ``x.track_id``; 0 if never played."""
        row = self._vocab.index.get(x.track_id)
        if row is None or row >= len(self._weights) or self._total <= 0:
            return 0.0
        return float(self._weights[row] / self._total)

    def score_many(self, x: Interaction, track_ids: Sequence[str]) -> FloatArray:
        rows = self._vocab.rows(track_ids)
        scores = self.score_all()
        return np.where(rows >= 0, scores[np.maximum(rows, 0)] if len(scores) else 0.0, 0.0)

    def candidates(
        self, x: Interaction, n: int, exclude: Collection[str] = frozenset()
    ) -> dict[str, float]:
        """The ``n`` most played tracks not in ``exclude``, with their share of plays."""
        scores = self.score_all().copy()
        scores[self._vocab.known_rows(exclude)] = -np.inf
        ids = self._vocab.ids
        return {ids[r]: float(scores[r]) for r in top_rows(scores, n).tolist()}
