"""Fault drills on the real stack, short variants (the long ones: ``python -m
load_tests.faults``; see docs/reliability.md).

- crash loop: SIGKILL + restart the worker 3 times while plays stream in; every play is
  applied exactly once (per-listener ``seq`` / ``plays_total`` == distinct plays produced);
- Redis outage: a PRIVATE redis-server is stopped ~8 s mid-stream; the worker keeps
  consuming, counts and logs the errors, and brings Redis up to date when it returns;
- broker restart: a PRIVATE Kafka broker is restarted under a running worker;
- hostile input: 2k fuzzed records; each rejected one is in the DLQ with the reason
  :func:`stream.events.parse_event` gives, each valid one applied once, RSS bounded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from load_tests import faults
from stream.config import Settings

pytestmark = pytest.mark.integration


def fast_failover(worker_factory: Callable[..., faults.Worker]) -> faults.StartWorker:
    return lambda s: worker_factory(s, **faults.FAST_FAILOVER_ENV)


def assert_exactly_once(report: dict) -> None:
    assert report["users_missing"] == 0, report
    assert report["lost"] == 0, report
    assert report["double_applied"] == 0, report
    assert report["seq_plays_total_mismatch"] == 0, report
    assert report["users_without_recommendations"] == 0, report


def test_crash_loop_loses_and_double_counts_nothing(
    settings: Settings, worker_factory: Callable[..., faults.Worker]
) -> None:
    report = faults.crash_loop(
        settings, fast_failover(worker_factory), kills=3, users=30, rate=100.0,
        min_uptime_s=1.0, max_uptime_s=3.0, catch_up_timeout_s=90.0,
    )
    assert report["produced"] > 500
    assert len(report["kill_log"]) == 3
    assert report["worker_alive"]
    assert_exactly_once(report)
