"""Keys and signatures against the real stack (issue 15, items 3 and 4): a keyless or
mis-keyed play or control command is dead-lettered as ``key_mismatch``; workers with
different worker keys do not learn from each other's signals; a worker without keys
refuses control commands."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from stream.adapters.kafka import ensure_topics, make_producer, read_topic
from stream.adapters.redis_store import RecoReader
from stream.config import Settings
from stream.core.events import PlayEvent, encode_event
from stream.processing.auth import KeyRing
from stream.processing.control import PURPOSE, encode_forget, forget_record

from .conftest import free_port, produce, wait_until

pytestmark = pytest.mark.integration


def send(settings: Settings, topic: str, records: list[tuple[bytes | None, bytes, list]]) -> None:
    async def go() -> None:
        await ensure_topics(settings)
        p = make_producer(settings)
        await p.start()
        try:
            for key, value, headers in records:
                await p.send_and_wait(topic, value, key=key, headers=headers or None)
        finally:
            await p.stop()

    asyncio.run(go())


def play(user: str, i: int) -> PlayEvent:
    ts = int(time.time() * 1000) - 60_000 + i
    return PlayEvent(user, f"t{i % 7}", ts, 200_000, f"{user}-{i}")


def dlq_by_reason(settings: Settings, n: int) -> dict[str, list[dict[str, str]]]:
    records = asyncio.run(read_topic(settings, settings.dlq_topic, max_messages=n, timeout_s=30))
    out: dict[str, list[dict[str, str]]] = {}
    for r in records:
        headers = {k: v.decode() for k, v in r.headers}
        out.setdefault(headers["dlq.reason"], []).append(headers | {"key": repr(r.key)})
    return out


def test_keyless_and_miskeyed_plays_and_control_commands_are_dead_lettered(
    settings: Settings, worker_factory, reader: RecoReader
) -> None:
    worker = worker_factory()
    ring = KeyRing.parse(settings.worker_keys)
    victim = "km-victim"
    produce(settings, [play(victim, 0)])
    wait_until(lambda: reader.get(victim), 30, what="victim's list")

    # plays: no key, and another listener's key
    send(settings, settings.plays_topic, [
        (None, encode_event(play("km-keyless", 1)), []),
        (b"km-someone-else", encode_event(play("km-mismatch", 2)), []),
    ])
    # control: correctly signed forgets of the victim, without a key / under another key
    value = encode_forget(victim)
    keyless = (None, value, ring.sign(PURPOSE, settings.control_topic, None, value))
    other = b"km-other"
    rekeyed = (other, value, ring.sign(PURPOSE, settings.control_topic, other, value))
    send(settings, settings.control_topic, [keyless, rekeyed])

    dlq = dlq_by_reason(settings, 4)
    mismatched = dlq.get("key_mismatch", [])
    assert sorted(h["dlq.topic"] for h in mismatched) == sorted(
        [settings.plays_topic] * 2 + [settings.control_topic] * 2
    ), dlq
    assert all(h["dlq.detail"] for h in mismatched)
    assert worker.metric_value(
        "stream_events_rejected_total", topic=settings.plays_topic, reason="key_mismatch"
    ) == 2
    assert worker.metric_value(
        "stream_events_rejected_total", topic=settings.control_topic, reason="key_mismatch"
    ) == 2
    assert reader.get("km-keyless") is None and reader.get("km-mismatch") is None
    assert reader.get(victim) is not None, "a mis-keyed forget erased the listener"
    assert worker.metric_value("stream_control_commands_total", result="forgotten") == 0

    # the same command, keyed right, is applied
    send(settings, settings.control_topic, [forget_record(victim, ring, settings.control_topic)])
    wait_until(lambda: reader.get(victim) is None, 30, what="victim forgotten")


def test_workers_with_different_keys_do_not_learn_from_each_other(
    settings: Settings, worker_factory
) -> None:
    a = worker_factory(settings.replace(worker_keys=f"a:{uuid.uuid4().hex}"))
    b = worker_factory(
        settings.replace(worker_keys=f"b:{uuid.uuid4().hex}", metrics_port=free_port())
    )
    users = [f"dk-u{i}" for i in range(40)]
    produce(settings, [play(u, i) for i in range(3) for u in users])

    def rejected() -> float:
        return sum(
            w.metric_value("stream_signals_rejected_total", reason="unknown_key") for w in (a, b)
        )

    wait_until(lambda: rejected() > 0, 60, what="signals refused as unknown_key")
    sent = sum(w.metric_value("stream_track_signals_total", direction="sent") for w in (a, b))
    assert sent > 0
    assert sum(
        w.metric_value("stream_track_signals_total", direction="applied") for w in (a, b)
    ) == 0


def test_a_worker_without_keys_refuses_control_commands(
    settings: Settings, worker_factory, reader: RecoReader
) -> None:
    settings = settings.replace(worker_keys="")
    worker = worker_factory(settings)
    assert "worker_keys is not set" in worker.log_text()
    user = "nk-user"
    produce(settings, [play(user, 0)])
    wait_until(lambda: reader.get(user), 30, what="listener's list")
    # unsigned, and signed with some key: neither can be checked, both are refused
    some = KeyRing.parse(f"k:{uuid.uuid4().hex}")
    send(settings, settings.control_topic, [
        (user.encode(), encode_forget(user), []),
        forget_record(user, some, settings.control_topic),
    ])
    dlq = dlq_by_reason(settings, 2)
    assert sorted(dlq) == ["unknown_key", "unsigned"], dlq
    assert reader.get(user) is not None
    assert worker.metric_value("stream_control_commands_total", result="rejected") == 2
    # and it sends no track signals nobody could verify
    assert worker.metric_value("stream_track_signals_total", direction="sent") == 0
