"""The Redis contract against the real Redis: atomic guarded writes, TTL, notifications."""

from __future__ import annotations

import asyncio
import os
import time

import orjson
import pytest

from stream.adapters.redis_store import (
    BAD_SEQ,
    WRITE_SCRIPT,
    WRONG_TYPE,
    PendingWrite,
    RecoReader,
    RecoWriter,
    checkpoint_key,
    connect_async,
    encode_document,
    save_checkpoint,
)
from stream.config import Settings
from stream.core.recommender import Recommendation

from .conftest import collect_notifications, drain_notifications, subscribe_confirmed, wait_until

pytestmark = pytest.mark.integration


def write_for(
    settings: Settings, user: str, seq: int, track: str, lineage: str = ""
) -> PendingWrite:
    doc, note = encode_document(
        user_id=user,
        seq=seq,
        items=[Recommendation(track, 1.0, "because")],
        generated_at_ms=int(time.time() * 1000),
        event_ts_ms=1_700_000_000_000 + seq,
        event_id=f"e{seq}",
        model_version="test",
        lineage=lineage,
    )
    return PendingWrite(
        f"{settings.redis_prefix}{user}",
        seq,
        doc,
        note,
        1_700_000_000_000 + seq,
        None,
        time.perf_counter(),
        lineage,
    )


def test_writer_never_regresses_and_publishes(settings: Settings, reader: RecoReader) -> None:
    flushed: list[list[int]] = []

    async def scenario() -> None:
        client = connect_async(settings.redis_url, settings.redis_password)
        writer = RecoWriter(
            client,
            ttl_s=60,
            channel=settings.notify_channel,
            on_flush=lambda b, r, s: flushed.append(r),
        )
        writer.start()
        writer.submit(write_for(settings, "u1", 5, "newer"))
        await asyncio.wait_for(writer.drained(), 30)
        writer.submit(write_for(settings, "u1", 3, "older"))  # a late, re-delivered write
        await asyncio.wait_for(writer.drained(), 30)
        writer.submit(write_for(settings, "u1", 5, "same-seq-rewrite"))
        await asyncio.wait_for(writer.drained(), 30)
        await writer.stop()
        await client.aclose()

    pubsub = subscribe_confirmed(reader.client, settings.notify_channel)
    try:
        asyncio.run(scenario())
        doc = reader.get("u1")
        assert doc is not None and doc.seq == 5
        assert doc.items[0].track_id == "same-seq-rewrite"
        assert flushed == [[1], [0], [1]]
        ttl = reader.client.ttl(f"{settings.redis_prefix}u1")
        assert 0 < ttl <= 60
        notes = collect_notifications(pubsub, lambda ns: len(ns) >= 2, 30, what="2 notes")
        notes += drain_notifications(pubsub)
    finally:
        pubsub.close()
    assert [n["seq"] for n in notes] == [5, 5]  # the refused write published nothing


def test_submit_coalesces_per_user(settings: Settings, reader: RecoReader) -> None:
    batches: list[int] = []

    async def scenario() -> None:
        client = connect_async(settings.redis_url, settings.redis_password)
        writer = RecoWriter(
            client,
            ttl_s=60,
            channel="",
            flush_interval_ms=50,
            on_flush=lambda b, r, s: batches.append(len(b)),
        )
        writer.start()
        for seq in range(1, 101):
            writer.submit(write_for(settings, "u2", seq, f"t{seq}"))
        await asyncio.wait_for(writer.drained(), 30)
        await writer.stop()
        await client.aclose()

    asyncio.run(scenario())
    assert batches == [1]
    doc = reader.get("u2")
    assert doc is not None and doc.seq == 100 and doc.items[0].track_id == "t100"


def test_reader_updates_yields_notifications(settings: Settings, reader: RecoReader) -> None:
    import threading

    got: list[dict[str, object]] = []

    def listen() -> None:
        # a quiet bound generous enough for a loaded box; the listener ends at the third
        for note in reader.updates(timeout_s=30):
            got.append(note)
            if len(got) == 3:
                return

    t = threading.Thread(target=listen)
    t.start()
    # the listener thread has subscribed once the server counts a subscriber on the channel
    wait_until(
        lambda: dict(reader.client.pubsub_numsub(settings.notify_channel)).get(
            settings.notify_channel.encode(), 0
        ) >= 1,
        30,
        interval=0.02,
        what="the updates() listener subscribed",
    )

    async def scenario() -> None:
        client = connect_async(settings.redis_url, settings.redis_password)
        writer = RecoWriter(client, ttl_s=60, channel=settings.notify_channel)
        writer.start()
        for i, user in enumerate(["n1", "n2", "n3"], start=1):
            writer.submit(write_for(settings, user, i, "t"))
            await asyncio.wait_for(writer.drained(), 30)
        await writer.stop()
        await client.aclose()

    asyncio.run(scenario())
    t.join(60)
    assert not t.is_alive(), f"the listener got {got} of 3 notifications in 60 s"
    assert [n["user_id"] for n in got] == ["n1", "n2", "n3"]


def test_forget_drops_a_pending_write_so_the_delete_is_final(
    settings: Settings, reader: RecoReader
) -> None:
    """A listener forgotten while their document waits for the next flush: the flush
    deletes the stored document and writes nothing for them (no document, no notification),
    while another listener's pending write in the same flush goes through."""
    victim_key = f"{settings.redis_prefix}victim"
    reader.client.set(victim_key, b"{}")  # the document stored before the forget
    flushed: list[list[int]] = []

    async def scenario() -> None:
        client = connect_async(settings.redis_url, settings.redis_password)
        writer = RecoWriter(
            client,
            ttl_s=60,
            channel=settings.notify_channel,
            on_flush=lambda b, r, s: flushed.append(r),
        )
        writer.start()
        # no await in between: the flusher cannot run before the forget
        writer.submit(write_for(settings, "victim", 7, "queued-before-forget"))
        writer.submit(write_for(settings, "bystander", 1, "kept"))
        writer.forget(victim_key)
        await asyncio.wait_for(writer.drained(), 30)
        await writer.stop()
        await client.aclose()

    pubsub = subscribe_confirmed(reader.client, settings.notify_channel)
    try:
        asyncio.run(scenario())
        bystander = reader.get("bystander")
        assert bystander is not None and bystander.items[0].track_id == "kept"
        assert reader.client.exists(victim_key) == 0, "the forgotten listener's doc came back"
        assert flushed == [[1]]  # one write only: the bystander's
        notes = collect_notifications(
            pubsub, lambda ns: any(n["user_id"] == "bystander" for n in ns), 30,
            what="the bystander's notification",
        )
        notes += drain_notifications(pubsub)
        assert [n["user_id"] for n in notes] == ["bystander"]
    finally:
        pubsub.close()


def test_guard_is_per_lineage(settings: Settings, reader: RecoReader) -> None:
    async def write(lineage: str, seq: int, track: str) -> list[int]:
        client = connect_async(settings.redis_url, settings.redis_password)
        results: list[int] = []
        writer = RecoWriter(
            client,
            ttl_s=60,
            channel="",
            on_flush=lambda b, r, s: results.extend(r),
        )
        writer.start()
        writer.submit(write_for(settings, "lin", seq, track, lineage))
        await asyncio.wait_for(writer.drained(), 30)
        await writer.stop()
        await client.aclose()
        return results

    assert asyncio.run(write("app-a", 50, "a50")) == [1]
    assert asyncio.run(write("app-a", 10, "a10")) == [0]  # same lineage: no regression
    assert asyncio.run(write("app-b", 1, "b1")) == [1]  # a new deployment takes over
    doc = reader.get("lin")
    assert doc is not None and doc.seq == 1 and doc.items[0].track_id == "b1"


def test_writer_recovers_from_lost_scripts_and_dropped_connections(
    settings: Settings, reader: RecoReader
) -> None:
    """The hand-packed round trip: a flushed script cache (NOSCRIPT) is reloaded and the
    batch resent; a connection the server killed is replaced."""
    results: list[list[int]] = []

    async def scenario() -> None:
        client = connect_async(settings.redis_url, settings.redis_password)
        writer = RecoWriter(
            client,
            ttl_s=60,
            channel="",
            retry_max_s=0.2,
            on_flush=lambda b, r, s: results.append(r),
        )
        writer.start()
        writer.submit(write_for(settings, "r1", 1, "first"))
        await asyncio.wait_for(writer.drained(), 30)
        reader.client.script_flush()
        writer.submit(write_for(settings, "r1", 2, "after-script-flush"))
        await asyncio.wait_for(writer.drained(), 30)
        reader.client.client_kill_filter(_type="normal", skipme=True)
        writer.submit(write_for(settings, "r1", 3, "after-kill"))
        await asyncio.wait_for(writer.drained(), 30)
        await writer.stop()
        await client.aclose()

    asyncio.run(scenario())
    doc = reader.get("r1")
    assert doc is not None and doc.items[0].track_id == "after-kill"
    assert results == [[1], [1], [1]]


def test_a_poisoned_key_is_isolated_within_one_flush(
    settings: Settings, reader: RecoReader
) -> None:
    """Issue 15: with ``reco:victim`` holding a hash and another listener's stored document
    (of this lineage) carrying a non-numeric seq, the first flush still writes every other
    document and the similar list (not one flush later); each poisoned key is retried
    ``key_attempts`` times, counted with its reason, dropped, and left as it was."""
    prefix = settings.redis_prefix
    victim, bad_seq = f"{prefix}victim", f"{prefix}badseq"
    reader.client.hset(victim, "x", "1")
    reader.client.set(bad_seq, orjson.dumps({"seq": "NaN-ish", "lineage": "app"}))
    events: list[tuple[str, str, bool]] = []
    flushes: list[list[str]] = []

    async def scenario() -> None:
        client = connect_async(settings.redis_url, settings.redis_password)
        writer = RecoWriter(
            client,
            ttl_s=60,
            channel=settings.notify_channel,
            flush_interval_ms=0,
            key_retry_s=0.02,
            on_flush=lambda b, r, s: flushes.append([w.key for w in b]),
            on_key_error=lambda kind, reason, dropped: events.append((kind, reason, dropped)),
        )
        writer.submit(write_for(settings, "before", 1, "t-before", "app"))
        writer.submit(PendingWrite(victim, 1, b"{}", b"{}", 0, None, 0.0, "app"))
        writer.submit(write_for(settings, "badseq", 5, "t-bad", "app"))
        writer.submit(write_for(settings, "after", 1, "t-after", "app"))
        writer.submit_plain(f"{settings.similar_prefix}t1", b'{"track_id": "t1"}')
        assert await writer.flush_once()
        # one flush: everyone else is in Redis already
        assert reader.get("before") is not None and reader.get("after") is not None
        assert reader.similar("t1") == {"track_id": "t1"}
        assert set(writer.pending) == {victim, bad_seq}
        writer.start()
        await asyncio.wait_for(writer.drained(), 30)
        await writer.stop()
        await client.aclose()

    try:
        asyncio.run(scenario())
        assert flushes[0] == [f"{prefix}before", f"{prefix}after"]
        assert sorted(events) == sorted(
            [("doc", "wrong_type", False)] * 2
            + [("doc", "wrong_type", True)]
            + [("doc", "bad_seq", False)] * 2
            + [("doc", "bad_seq", True)]
        )
        assert reader.client.type(victim) == b"hash"
        assert reader.client.hgetall(victim) == {b"x": b"1"}
        assert orjson.loads(reader.client.get(bad_seq))["seq"] == "NaN-ish"
    finally:
        reader.client.delete(victim, bad_seq, f"{settings.similar_prefix}t1")


def test_the_guard_script_reports_each_poisoned_value(
    settings: Settings, reader: RecoReader
) -> None:
    """WRITE_SCRIPT's statuses against the real Redis: a wrong type and a stored seq that
    is not a number are distinct statuses and leave the key alone; a lower seq of the same
    lineage is still refused; a non-JSON value or another lineage's document is replaced."""
    sha = reader.client.script_load(WRITE_SCRIPT)
    key = f"{settings.redis_prefix}guard"

    def write(seq: int, lineage: str = "app") -> int:
        doc = b'{"seq": %d, "lineage": "%s"}' % (seq, lineage.encode())
        return int(reader.client.evalsha(sha, 1, key, seq, doc, 60, "", b"", lineage))

    try:
        reader.client.rpush(key, "x")
        assert write(1) == WRONG_TYPE and reader.client.type(key) == b"list"
        reader.client.delete(key)
        reader.client.zadd(key, {"x": 1})
        assert write(1) == WRONG_TYPE and reader.client.type(key) == b"zset"
        for stored in (
            b'{"seq": "x", "lineage": "app"}',
            b'{"lineage": "app"}',
            b'{"seq": 1e300, "lineage": "app"}',
            b'{"seq": null, "lineage": "app"}',
            b'{"seq": [1], "lineage": "app"}',
        ):
            reader.client.set(key, stored)
            assert write(1) == BAD_SEQ, stored
            assert reader.client.get(key) == stored
        reader.client.set(key, b'{"seq": "x", "lineage": "other"}')
        assert write(1) == 1  # another lineage's document: replaced, no order to keep
        assert write(9) == 1 and write(3) == 0 and write(9) == 1  # never back
        assert orjson.loads(reader.client.get(key))["seq"] == 9
        reader.client.set(key, b"not json")
        assert write(2) == 1
        reader.client.set(key, b'{"seq": "7", "lineage": "app"}')  # a numeric string
        assert write(6) == 0 and write(7) == 1
    finally:
        reader.client.delete(key)


def test_checkpoint_upload_is_chunked_atomic_and_leaves_nothing_behind(
    settings: Settings, reader: RecoReader
) -> None:
    """save_checkpoint sends the blob in pieces to an upload key and RENAMEs it in place:
    the result is byte for byte the blob, has no expiry, replaces the previous one, and no
    upload key is left; while it uploads, other clients' commands are served in between."""
    key = checkpoint_key(settings.app_id)
    first, second = os.urandom(3 * 2**20 + 12345), os.urandom(2**20 + 1)

    async def main() -> list[float]:
        client = connect_async(settings.redis_url, settings.redis_password)
        other = connect_async(settings.redis_url, settings.redis_password)
        try:
            await save_checkpoint(client, key, first, chunk=2**20)
            assert await client.get(key) == first
            # a concurrent client keeps getting answers while a 24 MB upload runs
            big = os.urandom(24 * 2**20)
            upload = asyncio.ensure_future(save_checkpoint(client, key, big, chunk=2**20))
            pings: list[float] = []
            while not upload.done():
                t = time.perf_counter()
                await other.ping()
                pings.append(time.perf_counter() - t)
            await upload
            assert await client.get(key) == big
            await save_checkpoint(client, key, second, chunk=2**20)
            assert await client.get(key) == second
            assert await client.ttl(key) == -1  # no expiry: it is the model
            left = [k async for k in client.scan_iter(match=f"{{{key}}}:upload:*")]
            assert left == []
            return pings
        finally:
            await client.delete(key)
            await client.aclose()
            await other.aclose()

    pings = asyncio.run(main())
    assert len(pings) >= 5, "the other client was not served during the upload"
