"""The recommendation core: learns from one play at a time and ranks tracks for a listener.

Pure: no Kafka, Redis or Prometheus. The worker, the offline replay and the benchmarks all
drive this same class. Time is always the event's time, passed in.

>>> from stream.events import PlayEvent
>>> from stream.session import update_session
>>> rec = Recommender()
>>> states = {}
>>> for i, (user, track) in enumerate([("u", "a"), ("u", "b"), ("v", "a")]):
...     up = update_session(states.get(user), PlayEvent(user, track, 1_700_000_000_000 + i,
...                                                     200_000, f"e{i}"))
...     rec.learn_one(up)
...     states[user] = up.state
>>> [(r.track_id, r.reason) for r in rec.recommend(states["v"], k=2, now_ms=1_700_000_000_010)]
[('b', 'because you played a')]
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Final

from stream.session import SessionUpdate, UserState

MODEL_VERSION: Final = "cooc-pop-1"


@dataclass(frozen=True, slots=True)
class Recommendation:
    """One ranked track with a human-readable reason."""

    track_id: str
    score: float
    reason: str


class DecayedPopularity:
    """Time-decayed play counts: each play adds weight that halves every ``half_life_ms``.

    Scores are kept in a log-domain-free form: weights are stored relative to a moving
    reference time, so no per-step decay of every item is needed.
    """

    def __init__(self, half_life_ms: int = 7 * 24 * 3600 * 1000) -> None:
        if half_life_ms <= 0:
            raise ValueError("half_life_ms must be > 0")
        self.half_life_ms = half_life_ms
        self._rate = math.log(2) / half_life_ms
        self._ref_ms: int | None = None
        self.weights: dict[str, float] = {}

    def learn_one(self, track_id: str, ts_ms: int, weight: float = 1.0) -> None:
        if self._ref_ms is None:
            self._ref_ms = ts_ms
        exponent = (ts_ms - self._ref_ms) * self._rate
        if exponent > 50:  # rebase before floats overflow
            shift = math.exp(-exponent)
            self.weights = {k: v * shift for k, v in self.weights.items()}
            self._ref_ms = ts_ms
            exponent = 0.0
        self.weights[track_id] = self.weights.get(track_id, 0.0) + weight * math.exp(exponent)

    def top(self, n: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[tuple[str, float]]:
        total = sum(self.weights.values()) or 1.0
        ranked = sorted(self.weights.items(), key=lambda kv: (-kv[1], kv[0]))
        out: list[tuple[str, float]] = []
        for track, w in ranked:
            if track in exclude:
                continue
            out.append((track, w / total))
            if len(out) >= n:
                break
        return out


class SessionCooccurrence:
    """Counts of 'track B played after track A in the same session', weighted by distance."""

    def __init__(self, window: int = 3, decay: float = 0.6, max_neighbours: int = 200) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        if not 0 < decay <= 1:
            raise ValueError("decay must be in (0, 1]")
        self.window = window
        self.decay = decay
        self.max_neighbours = max_neighbours
        self.counts: dict[str, dict[str, float]] = defaultdict(dict)

    def learn_one(self, history: list[str], track_id: str, weight: float = 1.0) -> None:
        for dist, prev in enumerate(reversed(history[-self.window :])):
            if prev == track_id:
                continue
            row = self.counts[prev]
            row[track_id] = row.get(track_id, 0.0) + weight * self.decay**dist
            if len(row) > self.max_neighbours * 2:
                keep = sorted(row.items(), key=lambda kv: -kv[1])[: self.max_neighbours]
                self.counts[prev] = dict(keep)

    def neighbours(self, track_id: str) -> dict[str, float]:
        return self.counts.get(track_id, {})


class Recommender:
    """Blend of session co-occurrence (what people play next) and decayed popularity."""

    def __init__(self, history_window: int = 5, history_decay: float = 0.6) -> None:
        self.history_window = history_window
        self.history_decay = history_decay
        self.popularity = DecayedPopularity()
        self.cooc = SessionCooccurrence()
        self.model_version = MODEL_VERSION

    def learn_one(self, update: SessionUpdate) -> None:
        """Learn from one applied (non-duplicate) event."""
        if update.duplicate:
            return
        state = update.state
        track = state.recent[-1]
        skipped = update.is_skip
        weight = 0.2 if skipped else 1.0
        self.popularity.learn_one(track, state.last_event_ts_ms, weight)
        if not update.new_session and update.before.recent:
            self.cooc.learn_one(update.before.recent, track, weight)

    def recommend(self, state: UserState, k: int, now_ms: int) -> list[Recommendation]:
        """Top-k tracks for this listener, excluding what they played recently."""
        exclude = set(state.recent)
        scores: dict[str, float] = {}
        because: dict[str, str] = {}
        for dist, prev in enumerate(reversed(state.recent[-self.history_window :])):
            w = self.history_decay**dist
            nbrs = self.cooc.neighbours(prev)
            total = sum(nbrs.values()) or 1.0
            for track, c in nbrs.items():
                if track in exclude:
                    continue
                s = w * c / total
                if s > scores.get(track, 0.0):
                    because[track] = prev
                scores[track] = scores.get(track, 0.0) + s
        ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        out = [Recommendation(t, round(s, 6), f"because you played {because[t]}") for t, s in ranked]
        if len(out) < k:
            taken = exclude | {r.track_id for r in out}
            for track, s in self.popularity.top(k - len(out), taken):
                out.append(Recommendation(track, round(s * 0.01, 6), "popular right now"))
        return out
