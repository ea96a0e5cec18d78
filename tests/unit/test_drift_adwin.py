"""stream.core.models.drift.AdaptiveWindow against river's ADWIN: the same decisions and the
same window statistics, value for value, on real-shaped and synthetic streams."""

from __future__ import annotations

import random

import pytest
from river import drift

from stream.core.models.drift import AdaptiveWindow


def streams() -> dict[str, list[float]]:
    rng = random.Random(3)
    out: dict[str, list[float]] = {}
    values, p = [], 0.2
    for i in range(30_000):  # skip indicators whose rate jumps every 5,000 plays
        if i % 5000 == 0:
            p = rng.random()
        values.append(1.0 if rng.random() < p else 0.0)
    out["skip_rate_jumps"] = values
    out["gaussian_shift"] = [rng.gauss(0, 1) + (3 if i > 8000 else 0) for i in range(20_000)]
    out["growing_spread"] = [rng.random() * (1 + i // 3000) for i in range(30_000)]
    out["steady"] = [float(i % 3 == 0) for i in range(10_000)]
    return out


@pytest.mark.parametrize("name", list(streams()))
@pytest.mark.parametrize("delta", [0.002, 0.05])
def test_decisions_and_statistics_match_river(name: str, delta: float) -> None:
    values = streams()[name]
    theirs = drift.ADWIN(delta=delta)
    ours, detected = AdaptiveWindow(delta=delta), False
    hits = 0
    for i, v in enumerate(values):
        theirs.update(v)
        if detected:  # river's ADWIN starts a new window after a detection; so does ours
            ours = AdaptiveWindow(delta=delta)
        detected = ours.update(v)
        assert detected == theirs.drift_detected, (name, i)
        assert (ours.width, ours.total, ours.variance) == (
            theirs.width, theirs.total, theirs.variance), (name, i)
        assert ours.estimation == theirs.estimation
        hits += detected
    assert (hits == 0) == (name == "steady")
