"""Trending tracks: time-decayed play counts."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

from stream.core.models._state import get_array, get_field
from stream.core.models._vocab import (
    BoolArray,
    EvictionPlan,
    IntArray,
    Vocabulary,
    VocabularyModel,
    grow_rows,
    top_rows,
    top_set,
)
from stream.core.models.base import FloatArray, Interaction, check_fraction, check_positive
from stream.core.shards import MASK as SHARD_MASK

#: Rebase the reference time before exp() gets anywhere near float overflow.
_MAX_EXPONENT = 50.0

#: How many of the heaviest rows :meth:`DecayedPopularity.top_rows` keeps up to date.
_TOP_SIZE = 256


class DecayedPopularity(VocabularyModel):
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
        # The heaviest rows (at most _TOP_SIZE), so top-n queries need not scan the
        # catalogue: every row outside has weight <= every row inside (ties: the lower row
        # inside). Weights only grow between rebases, so a play can only move its own row in.
        self._top: dict[int, int] = {}  # member row -> its slot in _top_rows
        self._top_rows: IntArray = np.zeros(_TOP_SIZE, dtype=np.int64)
        self._top_floor = -1.0  # <= the lightest member's weight (refreshed lazily)

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
            self._rebuild_top()  # rounding may have tied weights that differed
        row = self._vocab.add(x.track_id)
        self._weights = grow_rows(self._weights, row + 1)
        w = (self.skip_weight if x.skipped else 1.0) * math.exp(max(exponent, -_MAX_EXPONENT))
        self._weights[row] += w
        self._total += w
        top = self._top
        if row in top or w <= 0:
            return
        if len(top) < _TOP_SIZE:
            self._top_rows[len(top)] = row
            top[row] = len(top)
        elif self._weights[row] >= self._top_floor:
            self._challenge(row)

    # -- checkpoints ----------------------------------------------------------------------

    _PARAMS: dict[str, Any] = {"half_life_ms": float, "skip_weight": float, "seed": int}
    _WHERE = "popularity"

    def _export_fields(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The decayed weight per row and the kept top set (in slot order, so a restored
        model breaks ties exactly as this one does)."""
        fields: dict[str, Any] = {
            "ref_ms": self._ref_ms,
            "total": float(self._total),
            "top_floor": float(self._top_floor),
        }
        arrays: dict[str, np.ndarray] = {
            "weights": self._weights[: len(self._vocab)].copy(),
            "top": self._top_rows[: len(self._top)].copy(),
        }
        return fields, arrays

    def _import_fields(
        self, manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray], where: str
    ) -> None:
        """The weights and the top set, checked against the vocabulary."""
        array = partial(get_array, arrays, where=where)
        n = len(self._vocab)
        self._ref_ms = get_field(manifest, "ref_ms", int, where=where, optional=True)
        self._total = get_field(manifest, "total", float, where=where, lo=0.0)
        self._top_floor = get_field(manifest, "top_floor", float, where=where, lo=-1.0)
        weights = array("weights", np.float64, ndim=1, finite=True, lo=0.0)
        if len(weights) > n:
            raise ValueError(f"{where}.weights: {len(weights)} rows, the vocabulary has {n}")
        top = array("top", np.int64, ndim=1, lo=0, hi=max(len(weights) - 1, 0))
        if len(top) > _TOP_SIZE or (len(top) and not len(weights)):
            raise ValueError(f"{where}.top: {len(top)} rows, at most {_TOP_SIZE} known rows")
        if len(np.unique(top)) != len(top):
            raise ValueError(f"{where}.top: repeated rows")
        self._weights = weights.copy()
        self._top = {int(r): slot for slot, r in enumerate(top.tolist())}
        self._top_rows[: len(top)] = top

    def _challenge(self, row: int) -> None:
        """Swap ``row`` into the top set if it now outranks the lightest member."""
        members = self._top_rows
        weights = self._weights[members]
        lightest = float(weights.min())
        worst = int(members[weights == lightest].max())
        w = float(self._weights[row])
        if w > lightest or (w == lightest and row < worst):
            slot = self._top.pop(worst)
            members[slot] = row
            self._top[row] = slot
            weights[slot] = w
            lightest = float(weights.min())
        self._top_floor = lightest

    def _rebuild_top(self) -> None:
        weights = self._weights[: len(self._vocab)]
        rows = [r for r in top_rows(weights, _TOP_SIZE).tolist() if weights[r] > 0]
        self._top = {r: slot for slot, r in enumerate(rows)}
        self._top_rows = np.zeros(_TOP_SIZE, dtype=np.int64)
        self._top_rows[: len(rows)] = rows
        self._top_floor = -1.0

    def top_set(self, n: int, banned: BoolArray) -> IntArray:
        """Rows of the ``n`` heaviest tracks whose ``banned`` flag (indexed by vocabulary row)
        is not set, in no particular order. Reads the kept top set only, unless bans leave it
        short."""
        size = len(self._vocab)
        members = self._top_rows[: len(self._top)]
        members = members[members < len(banned)]
        allowed = members[~banned[members]]
        if len(allowed) > n:
            out: IntArray = allowed[np.argpartition(-self._weights[allowed], n - 1)[:n]]
            return out
        if len(allowed) == n or len(members) >= size:
            return allowed
        scores = self.score_all().copy()
        scores[banned[:size]] = -np.inf
        return top_set(scores, n)

    def ranking_inputs(self, size: int) -> tuple[IntArray, FloatArray, float]:
        """For the compiled ranker: the kept top rows, the weight per row (at least
        ``size`` long) and the total weight."""
        self._weights = grow_rows(self._weights, size)
        return self._top_rows[: len(self._top)], self._weights, float(self._total)

    def score_inputs(self) -> tuple[FloatArray, float]:
        """What :meth:`score_rows` divides, for a compiled caller: the weight per row (at
        least the vocabulary's length) and the divisor (the total weight, 1 while 0)."""
        self._weights = grow_rows(self._weights, len(self._vocab))
        return self._weights, float(self._total or 1.0)

    def score_rows(self, rows: IntArray) -> FloatArray:
        """:meth:`score_all` at ``rows`` only."""
        self._weights = grow_rows(self._weights, len(self._vocab))
        out: FloatArray = self._weights[rows] / (self._total or 1.0)
        return out

    def score_all(self) -> FloatArray:
        """Every known track's share of the decayed plays, indexed by vocabulary row."""
        size = len(self._vocab)
        self._weights = grow_rows(self._weights, size)
        out: FloatArray = self._weights[:size] / (self._total or 1.0)
        return out

    def weights(self) -> FloatArray:
        """Decayed weight per vocabulary row (relative to the internal reference time)."""
        return self._weights[: len(self._vocab)]

    def evict_rows(self, plan: EvictionPlan) -> None:
        """Apply a catalogue eviction (see :class:`~stream.core.models._vocab.EvictionPlan`;
        called before the vocabulary applies it). O(evicted) plus one sum."""
        w = self._weights = grow_rows(self._weights, len(plan.remap))
        w[plan.holes] = w[plan.movers]
        w[plan.keep :] = 0.0
        self._total = float(w[: plan.keep].sum())
        members = plan.remap[self._top_rows[: len(self._top)]]
        if (members < 0).any():  # only when nearly everything goes: rebuild from scratch
            w_kept = w[: plan.keep]
            rows = [r for r in top_rows(w_kept, _TOP_SIZE).tolist() if w_kept[r] > 0]
            members = np.array(rows, dtype=np.int64)
            self._top_floor = -1.0
        self._top_rows = np.zeros(_TOP_SIZE, dtype=np.int64)
        self._top_rows[: len(members)] = members
        self._top = {int(r): slot for slot, r in enumerate(members.tolist())}

    def predict_one(self, x: Interaction) -> float:
        """Share of recent (decayed) plays that went to ``x.track_id``; 0 if never played."""
        row = self._vocab.index.shards[hash(x.track_id) & SHARD_MASK].get(x.track_id)
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
