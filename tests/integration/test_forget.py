"""Forget a user end to end: state, recommendations, and no resurrection after a restart --
neither a clean one (state rebuilt from the changelog) nor a SIGKILL followed by the
restore of a model checkpoint taken before the forget."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from stream.adapters.kafka import client_kwargs, make_producer
from stream.adapters.redis_store import RecoReader, checkpoint_key, load_checkpoint
from stream.config import Settings, redis_auth
from stream.core.events import PlayEvent
from stream.processing.auth import KeyRing
from stream.processing.control import forget_record
from stream.tools.datasets import load_events

from .conftest import WorkerProcess, produce, wait_until

pytestmark = pytest.mark.integration


def send_forget(settings: Settings, user: str) -> tuple[int, int]:
    """Send a forget request; returns its (partition, offset) in the control topic."""

    async def go() -> tuple[int, int]:
        p = make_producer(settings)
        await p.start()
        try:
            key, value, headers = forget_record(
                user, KeyRing.parse(settings.worker_keys), settings.control_topic
            )
            md = await p.send_and_wait(settings.control_topic, value, key=key, headers=headers)
            return md.partition, md.offset
        finally:
            await p.stop()

    return asyncio.run(go())


def committed_offset(settings: Settings, topic: str, partition: int) -> int:
    """The worker group's committed offset (the next to read) on one partition; -1 if none."""

    async def go() -> int:
        admin = AIOKafkaAdminClient(**client_kwargs(settings), request_timeout_ms=5000)
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(settings.app_id)
        finally:
            await admin.close()
        meta = offsets.get(TopicPartition(topic, partition))
        return meta.offset if meta is not None else -1

    return asyncio.run(go())


def wait_all_applied(reader: RecoReader, expected: dict[str, int], timeout: float = 90) -> None:
    """Until every listener's document holds all their plays (seq == plays produced): no
    play is still in flight when the test moves on."""

    def state() -> dict[str, int | None]:
        return {u: (d.seq if (d := reader.get(u)) else None) for u in expected}

    wait_until(lambda: state() == expected, timeout, what=f"seq per user == {expected}")


def test_forget_user_purges_state_and_survives_restart(
    settings: Settings, worker_factory, reader: RecoReader, datasets_dir: Path
) -> None:
    events = load_events(datasets_dir / "spotify-mssd-sample", "spotify")
    expected = dict(Counter(e.user_id for e in events))
    users = sorted(expected)
    victim, other = users[0], users[1]
    w1 = worker_factory()
    produce(settings, events)
    wait_all_applied(reader, expected)

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
    assert other_doc.seq == other_doc.session["plays_total"] == expected[other]
    assert w2.metric_value("stream_events_total", outcome="processed") == 1


def test_forget_then_sigkill_restores_no_trace_of_the_listener(
    settings: Settings, worker_factory, reader: RecoReader, datasets_dir: Path
) -> None:
    """A model checkpoint taken before the forget holds the listener's model state (their
    MF factors, read as stored, without the worker's restore-time filtering). The worker
    that applied the forget is SIGKILLed before any newer checkpoint, with the forget's
    offset committed (so the restart does not simply re-read and re-apply it): the
    restarted worker must hold nothing of the listener -- no model state (checked on its
    own final checkpoint), no session, no document."""
    # checkpoints only at a clean stop: none is taken after the forget
    settings = settings.replace(checkpoint_interval_s=3600.0)
    events = load_events(datasets_dir / "spotify-mssd-sample", "spotify")
    expected = dict(Counter(e.user_id for e in events))
    victim, other = sorted(expected)[:2]

    w1 = worker_factory(settings)
    produce(settings, events)
    wait_all_applied(reader, expected)
    assert w1.stop() == 0  # the final checkpoint: taken before the forget
    assert reader.client.exists(checkpoint_key(settings.app_id))
    before = checkpointed_models(settings)
    # since #17 a listener's model state (MF factors) lives in their session, on the
    # changelog, and the checkpoint is item-side only: it holds nothing of any listener
    assert before is not None and not before.forget_user(victim), (
        "the item-side checkpoint holds the victim's model state"
    )

    w2 = worker_factory(settings)
    assert w2.metric_value("stream_checkpoint_restored") == 1
    partition, offset = send_forget(settings, victim)
    wait_until(lambda: reader.get(victim) is None, 30, what="victim's recommendations deleted")
    assert w2.metric_value("stream_control_commands_total", result="forgotten") == 1
    wait_until(
        lambda: committed_offset(settings, settings.control_topic, partition) > offset,
        60,
        what="the forget request's offset committed",
    )
    w2.kill()  # SIGKILL: no final checkpoint; the one in Redis predates the forget

    w3 = worker_factory(settings)
    assert w3.metric_value("stream_checkpoint_restored") == 1
    assert reader.get(victim) is None
    assert w3.stop() == 0  # its final checkpoint is exactly the model state it restored
    assert forgets_applied(w2) == 1
    assert forgets_applied(w3) == 0, "the forget was re-applied: the restore was not tested"
    after = checkpointed_models(settings)
    assert after is not None
    assert not after.forget_user(victim), (
        "the restarted worker restored the forgotten listener's model state from a "
        "checkpoint taken before the forget"
    )

    # and their session is gone too: their next play is a brand-new listener's first
    w4 = worker_factory(settings)
    base = max(e.ts_ms for e in events) + 60_000
    produce(settings, [PlayEvent(victim, "t-new", base, 200_000, "after-forget-1"),
                       PlayEvent(other, "t-new", base, 200_000, "after-forget-2")])
    doc = wait_until(lambda: reader.get(victim), 60, what="victim's fresh doc")
    assert doc.seq == 1 and doc.session["plays_total"] == 1 and doc.session["sessions_total"] == 1
    # while another listener's session (and the model state in it) survived every restart
    other_doc = wait_until(lambda: (d := reader.get(other)) and d.seq == expected[other] + 1
                           and d, 60, what="the other listener's next doc")
    assert other_doc.session["plays_total"] == expected[other] + 1
    assert w4.metric_value("stream_events_total", outcome="processed") == 2


def checkpointed_models(settings: Settings) -> Any:
    """The recommender in the app's checkpoint in Redis, opened (and verified) as the worker
    opens it, but without dropping forgotten listeners: what the checkpoint itself holds."""
    from stream.core.checkpoint import open_checks, open_models

    blob = load_checkpoint(
        settings.redis_url,
        checkpoint_key(settings.app_id),
        max_bytes=settings.checkpoint_max_bytes,
        **redis_auth(settings),
    )
    assert blob is not None, "no checkpoint"
    rec, _ = open_models(blob, **open_checks(settings, int(time.time() * 1000)))
    return rec


def forgets_applied(worker: WorkerProcess) -> int:
    """Forget requests a worker applied, from its log (a stopped worker's metrics are gone)."""
    return worker.log_text().count("forgot user (request")
