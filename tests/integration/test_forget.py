"""Forget a user end to end: state, recommendations, and no resurrection after a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from stream.auth import KeyRing
from stream.config import Settings
from stream.control import forget_record
from stream.datasets import load_events
from stream.events import PlayEvent
from stream.kafka_io import make_producer
from stream.store import RecoReader

from .conftest import produce, wait_until

pytestmark = pytest.mark.integration


def send_forget(settings: Settings, user: str) -> None:
    async def go() -> None:
        p = make_producer(settings)
        await p.start()
        try:
            key, value, headers = forget_record(
                user, KeyRing.parse(settings.worker_keys), settings.control_topic
            )
            await p.send_and_wait(settings.control_topic, value, key=key, headers=headers)
        finally:
            await p.stop()

    asyncio.run(go())


def test_forget_user_purges_state_and_survives_restart(
    settings: Settings, worker_factory, reader: RecoReader, datasets_dir: Path
) -> None:
    events = load_events(datasets_dir / "spotify-mssd-sample", "spotify")
    users = sorted({e.user_id for e in events})
    victim, other = users[0], users[1]
    w1 = worker_factory()
    produce(settings, events)
    wait_until(lambda: all(reader.get(u) for u in users), 60, what="docs for every user")

    send_forget(settings, victim)
    wait_until(lambda: reader.get(victim) is None, 30, what="victim's recommendations deleted")
    assert reader.get(other) is not None
    assert w1.metric_value("stream_control_commands_total", result="forgotten") == 1
    assert w1.stop() == 0

    # after a restart (state rebuilt from the changelog) the victim is a brand-new listener
    w2 = worker_factory()
    base = max(e.ts_ms for e in events) + 60_000
    produce(settings, [PlayEvent(victim, "t-new", base, 200_000, "after-forget-1")])
    doc = wait_until(lambda: reader.get(victim), 60, what="victim's fresh doc")
    assert doc.seq == 1 and doc.session["plays_total"] == 1 and doc.session["sessions_total"] == 1
    other_doc = reader.get(other)
    assert other_doc is not None
    n_other = sum(1 for e in events if e.user_id == other)
    assert other_doc.session["plays_total"] == n_other
    assert w2.metric_value("stream_events_total", outcome="processed") == 1
