"""The CI variant of ``python -m load_tests.faults rebalance-storm``: workers of one group
killed (SIGKILL) or added every 10 s under 300 plays/s, on the shared stack."""

from __future__ import annotations

import pytest

from stream.config import Settings

pytestmark = pytest.mark.integration


def test_rebalance_storm_short(settings: Settings, worker_factory) -> None:
    from load_tests.cluster_faults import rebalance_storm

    report = rebalance_storm(
        settings, worker_factory, workers=2, rate=300, storm_s=40, every_s=10, users=100
    )
    # a join waits until the new worker is ready, so how many changes fit varies
    assert [c["change"] for c in report["changes"]][:2] == ["kill", "join"], report
    assert report["worker_alive"], report
    assert report["lost"] == 0 and report["double_applied"] == 0, report
    assert report["users_missing"] == 0, report
    assert report["notifications_during_storm"] > 0, report
    assert report["freshness_p99_ms"] is not None, report
