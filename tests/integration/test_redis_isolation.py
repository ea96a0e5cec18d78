"""One poisoned Redis key does not stop a real worker's writes (issue 15, item 2).

Reproduces the review's finding end to end: ``reco:victim`` holds a hash, so the guard
script cannot treat it as a document. Before writer isolation the whole batch was kept and
retried forever: other listeners stayed at their first list, or had none.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from stream.adapters.redis_store import RecoReader
from stream.config import Settings
from stream.core.events import PlayEvent

from .conftest import WorkerProcess, produce, wait_until

pytestmark = pytest.mark.integration

PLAYS_EACH = 25


def test_a_wrongtype_key_does_not_hold_back_other_listeners(
    settings: Settings,
    worker_factory: Callable[..., WorkerProcess],
    reader: RecoReader,
) -> None:
    victim = "victim"
    victim_key = f"{settings.redis_prefix}{victim}"
    reader.client.hset(victim_key, mapping={"planted": "by the test"})
    others = [f"listener-{i}" for i in range(6)]
    base = int(time.time() * 1000) - 3_600_000
    events = [
        PlayEvent(user, f"t{(n * 7 + i) % 40}", base + n * 60_000 + i, 200_000, f"{user}-{n}")
        for n in range(PLAYS_EACH)
        for i, user in enumerate([victim, *others])  # the victim's play first in each round
    ]
    worker = worker_factory()
    try:
        assert produce(settings, events) == len(events)

        def every_list_complete() -> bool:
            docs = [reader.get(u) for u in others]
            return all(d is not None and d.seq == PLAYS_EACH for d in docs)

        wait_until(every_list_complete, 60, what="every other listener's last list")
        # the victim's plays were processed and tried, then dropped and counted
        wait_until(
            lambda: worker.metric_value("stream_redis_writes_total", result="dropped") >= 1,
            30,
            what="the victim's write counted as dropped",
        )
        errors = worker.metric_value("stream_redis_write_errors_total", reason="wrong_type")
        assert errors >= 3  # key_attempts failed attempts before a drop
        assert worker.metric_value("stream_redis_write_errors_total") == errors  # no other
        # no flush failed as a whole: every flush that carried the victim wrote the others
        assert worker.metric_value("stream_redis_errors_total", operation="flush") == 0
        assert worker.metric_value("stream_events_total", outcome="processed") == len(events)
        assert "dropped the doc write to Redis key" in worker.log_text()
        # the planted key is left exactly as it was
        assert reader.client.type(victim_key) == b"hash"
        assert reader.client.hgetall(victim_key) == {b"planted": b"by the test"}
        wait_until(
            lambda: worker.metric_value("stream_redis_pending_writes") == 0,
            30,
            what="nothing left pending",
        )
        assert worker.stop() == 0
    finally:
        reader.client.delete(victim_key)
