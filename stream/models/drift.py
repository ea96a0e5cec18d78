"""Drift detection on the skip rate (or any 0/1 or error signal) with river's ADWIN."""

from __future__ import annotations

from typing import Any

from river import drift

from stream.models.base import Interaction, check_fraction


class SkipRateDrift:
    """ADWIN over the stream of skip indicators: flags when the skip rate shifts.

    After each :meth:`learn_one`, ``drift_detected`` says whether this event closed a
    change; ``n_detections`` and ``last_drift_ms`` (event time) accumulate for metrics.

    >>> d = SkipRateDrift()
    >>> for i in range(3000):
    ...     d.learn_one(Interaction("u", "t", i, skipped=i >= 1500 or i % 10 == 0))
    >>> d.n_detections >= 1, 1500 <= d.last_drift_ms < 1800
    (True, True)
    """

    def __init__(self, delta: float = 0.002, clock: int = 32, seed: int = 0) -> None:
        check_fraction("delta", delta)
        if clock < 1:
            raise ValueError(f"clock must be >= 1, got {clock!r}")
        self.delta = delta
        self.clock = clock
        self.seed = seed
        self.detector: Any = drift.ADWIN(delta=delta, clock=clock)  # type: ignore[no-untyped-call]
        self.drift_detected = False
        self.n_detections = 0
        self.last_drift_ms: int | None = None

    def update(self, value: float, ts_ms: int) -> bool:
        """Feed one observation (e.g. 1.0 for a skip, or a prediction error)."""
        self.detector.update(value)
        self.drift_detected = bool(self.detector.drift_detected)
        if self.drift_detected:
            self.n_detections += 1
            self.last_drift_ms = ts_ms
        return self.drift_detected

    def learn_one(self, x: Interaction) -> None:
        self.update(1.0 if x.skipped else 0.0, x.ts_ms)

    def predict_one(self, x: Interaction) -> float:
        """The current estimate of the skip rate over the adaptive window."""
        return float(self.detector.estimation)
