"""Reading a partition again (the plays agent's offset fence, stream.processing.fence) through
Faust's real fetch loop, the seam's consumer and a real broker.

A Faust app on the seam's transport reads 3,000 records of one partition. At offset 1,200 its
agent reads the partition again from 400, as the plays agent does after a hole. What reaches
the agent afterwards must be: records that were already in the stream's buffer (they are past
1,200: the plays agent drops them unapplied), then -- from the record the consumer marks as
the first one fetched after the seek -- exactly 400..2,999, in order, once. Before the seam
handled rereads (docs/reliability.md, the review of session 11's fences) the rest of a batch
fetched before the seek was delivered after it, Faust's read offset could end past the seek
offset (a seek during a callback was overwritten), and gaps recorded past the seek offset let
a commit pass records not read again yet."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from faust.types import TP

from stream.faustx import transport
from stream.faustx.app import SeamApp
from stream.faustx.options import SeamOptions
from stream.tools import stack

N, HOLE_AT, BACK_TO = 3000, 1200, 400


async def _produce(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        sends = [await producer.send(topic, key=b"k", value=str(i).encode()) for i in range(N)]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def _read_with_a_reread(bootstrap: str, buffer: int, in_loop: bool) -> dict[str, Any]:
    topic_name = f"reread-{uuid.uuid4().hex[:8]}"
    await _produce(bootstrap, topic_name)
    transport.register()
    app = SeamApp(f"reread-{uuid.uuid4().hex[:8]}",
                  seam=SeamOptions(in_loop=in_loop, hold_topics=frozenset({topic_name})),
                  broker=f"faustx://{bootstrap}", autodiscover=False, web_enabled=False,
                  consumer_auto_offset_reset="earliest", topic_partitions=1,
                  stream_buffer_maxsize=buffer)
    topic = app.topic(topic_name, key_type=bytes, value_type=bytes, key_serializer="raw",
                      value_serializer="raw")
    tp = TP(topic_name, 0)
    seen: list[tuple[int, bool]] = []  # (offset, the first record fetched after the seek)
    done = asyncio.Event()
    state = {"sought": False, "marked": False}

    @app.agent(topic)
    async def read(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            first = app.consumer.first_after_reread(tp) is msg  # type: ignore[attr-defined]
            state["marked"] = state["marked"] or first
            seen.append((msg.offset, first))
            if msg.offset == HOLE_AT and not state["sought"]:
                state["sought"] = True
                await app.consumer.read_again(tp, BACK_TO)  # type: ignore[attr-defined]
            if state["marked"] and msg.offset == N - 1:
                done.set()

    await app.start()
    with contextlib.suppress(asyncio.TimeoutError):  # the asserts below report what was seen
        await asyncio.wait_for(done.wait(), 90)
    consumer: Any = app.consumer
    result = {
        "seen": seen,
        "gaps": sorted((iv.begin, iv.end) for iv in consumer._gap[tp]),
        "rereads": dict(consumer.rereads),
    }
    await app.stop()
    return result


def _check(result: dict[str, Any]) -> int:
    """The stream after the reread is 400..2,999 once, in order; returns how many buffered
    records came between the hole and the first record read again."""
    seen = result["seen"]
    offsets = [offset for offset, _ in seen]
    assert offsets[: HOLE_AT + 1] == list(range(HOLE_AT + 1)), "the stream before the reread"
    marks = [i for i, (_, first) in enumerate(seen) if first]
    assert len(marks) == 1, f"one record marked as the first read again, got {len(marks)}: " \
        f"{[seen[i] for i in marks][:5]}; last records {seen[-5:]}"
    buffered = offsets[HOLE_AT + 1: marks[0]]
    assert all(HOLE_AT < o < N for o in buffered) and buffered == sorted(buffered), \
        f"only records buffered before the seek may come before the mark: {buffered[:10]}"
    after = offsets[marks[0]:]
    assert after == list(range(BACK_TO, N)), (
        f"after the reread: {len(after)} records, first {after[:5]}, jumps "
        f"{[(a, b) for a, b in zip(after, after[1:], strict=False) if b != a + 1][:5]}")
    assert result["gaps"] == [] and result["rereads"] == {}
    return len(buffered)


@pytest.mark.parametrize("in_loop", [True, False], ids=["in-loop", "consumer-thread"])
def test_a_reread_with_a_small_buffer_drops_the_batch_fetched_before_the_seek(
    services: stack.StackConfig, in_loop: bool
) -> None:
    """A 50-record buffer: the fetch loop is held in the middle of a fetched batch when the
    agent seeks, so the rest of that batch must be dropped by the seam's loop."""
    bootstrap = f"127.0.0.1:{services.kafka_port}"
    result = asyncio.run(_read_with_a_reread(bootstrap, 50, in_loop))
    buffered = _check(result)
    assert buffered <= 50 + 1, f"{buffered} records came between the hole and the reread"


def test_a_reread_with_everything_already_buffered(services: stack.StackConfig) -> None:
    """A 4,096-record buffer holds the whole partition before the seek: every record past the
    hole comes first (the plays agent drops them), then the partition from 400."""
    bootstrap = f"127.0.0.1:{services.kafka_port}"
    _check(asyncio.run(_read_with_a_reread(bootstrap, 4096, True)))
