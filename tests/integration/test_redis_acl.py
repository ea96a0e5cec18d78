"""Least privilege on the real Redis (issue 15, item 6): a private redis-server that admits
only the users of ``configs/redis/users.acl.in`` (started by
``stream.tools.stack.start_acl_redis``).

- the worker runs end to end as ``stream-worker`` and nothing else: plays in, listener
  documents, similar lists and notifications out, a checkpoint written and restored, and the
  server's ACL log shows no refusal of anything it sent;
- ``stream-reader`` reads and subscribes, and is refused every write;
- ``stream-worker`` is refused what it does not need;
- the default user is off.

The server is private (a free port, its own directory), so the default key names are used.
If it cannot start, the tests FAIL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import AuthenticationError, NoPermissionError

from stream.adapters.redis_store import WRITE_SCRIPT, RecoReader, checkpoint_key, same_slot_key
from stream.config import Settings
from stream.core.events import PlayEvent
from stream.tools import stack

from .conftest import (
    WorkerProcess,
    free_port,
    produce,
    subscribe_confirmed,
    wait_subscribed,
    wait_until,
)
from .test_forget import send_forget

pytestmark = pytest.mark.integration

PASSWORDS = {
    "stream-admin": "adm1n-acl-s3cret",
    "stream-worker": "w0rker-acl-s3cret",
    "stream-reader": "r3ader-acl-s3cret",
}


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[stack.RedisServer]:
    try:
        server = stack.start_acl_redis(tmp_path / "redis-acl", free_port(), PASSWORDS)
    except stack.StackError as exc:
        pytest.fail(f"could not start redis-server with configs/redis/users.acl.in: {exc}")
    yield server
    server.stop()


def client_as(server: stack.RedisServer, user: str) -> redis.Redis:
    return redis.Redis(port=server.port, username=user, password=PASSWORDS[user], socket_timeout=5)


def acl_refusals(server: stack.RedisServer, user: str) -> list[dict[str, Any]]:
    admin = client_as(server, "stream-admin")
    try:
        entries = admin.acl_log(count=1000)
    finally:
        admin.close()
    return [e for e in entries if e.get("username") == user]


def assert_refused(calls: list[Callable[[], Any]]) -> None:
    """Each call raises NoPermissionError (any other exception propagates)."""
    for i, call in enumerate(calls):
        try:
            call()
        except NoPermissionError:
            continue
        pytest.fail(f"call #{i} of the list was not refused")


def assert_subscribe_refused(client: redis.Redis, channel: str) -> None:
    pubsub = client.pubsub()
    try:
        with pytest.raises(NoPermissionError):
            pubsub.subscribe(channel)
            # the refusal is the reply to SUBSCRIBE, read by the first get_message; any
            # other reply (a confirmation) ends the wait without the error
            wait_until(lambda: pubsub.get_message(timeout=0.2) is not None, 30, interval=0,
                       what=f"the server's reply to SUBSCRIBE {channel}")
    finally:
        pubsub.close()


def test_the_worker_runs_end_to_end_as_the_worker_user(
    acl_redis: stack.RedisServer,
    settings: Settings,
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    s = settings.replace(
        redis_url=f"redis://127.0.0.1:{acl_redis.port}/0",
        redis_username="stream-worker",
        redis_password=PASSWORDS["stream-worker"],
        redis_prefix="reco:",
        similar_prefix="similar:",
        catalog_prefix="track:",
        notify_channel="reco-updates",
        checkpoint_interval_s=2.0,
        checkpoint_secret="acl-test-checkpoint-secret",
    )
    reader = RecoReader(
        s.redis_url,
        username="stream-reader",
        password=PASSWORDS["stream-reader"],
        prefix=s.redis_prefix,
        similar_prefix=s.similar_prefix,
        channel=s.notify_channel,
    )
    notes: list[dict[str, Any]] = []
    listening = threading.Thread(target=lambda: notes.extend(reader.updates(timeout_s=20)))
    users = [f"acl-u{i}" for i in range(4)]
    base = int(time.time() * 1000) - 600_000
    events = [
        PlayEvent(u, f"t{(n * 3 + i) % 12}", base + n * 30_000 + i, 200_000, f"{u}-{n}")
        for n in range(10)
        for i, u in enumerate(users)
    ]
    try:
        worker = worker_factory(s)
        listening.start()
        # the reader's subscription counted by the server (pub/sub keeps no history)
        admin = client_as(acl_redis, "stream-admin")
        try:
            wait_subscribed(admin, s.notify_channel)
        finally:
            admin.close()
        assert produce(s, events) == len(events)
        wait_until(
            lambda: all((d := reader.get(u)) is not None and d.seq == 10 for u in users),
            60,
            what="every listener's list, read as stream-reader",
        )
        similar = wait_until(lambda: reader.similar("t0"), 30, what="a similar list")
        assert similar["track_id"] == "t0"
        # a forget: its tombstone (ZADD, ZREMRANGEBYSCORE) is written as stream-worker too
        send_forget(s, users[0])
        wait_until(lambda: reader.get(users[0]) is None, 30, what="forgotten listener's list gone")
        wait_until(
            lambda: worker.metric_value("stream_checkpoints_total", result="written") >= 1,
            30,
            what="a checkpoint written as stream-worker",
        )
        assert worker.metric_value("stream_checkpoints_total", result="error") == 0
        assert worker.metric_value("stream_redis_write_errors_total") == 0
        assert worker.metric_value("stream_redis_errors_total", operation="flush") == 0
        assert worker.stop() == 0

        admin = client_as(acl_redis, "stream-admin")
        try:
            assert admin.exists(checkpoint_key(s.app_id)) == 1
            assert admin.keys("{model:*}:upload:*") == []  # uploads renamed into place
        finally:
            admin.close()
        # a restart reads the checkpoint back as the same user
        again = worker_factory(s)
        assert again.metric_value("stream_checkpoint_restored") == 1
        assert "1 forget tombstone(s)" in again.log_text()  # STRLEN, ZRANGEBYSCORE allowed
        assert again.stop() == 0
        listening.join(30)
        assert {n["user_id"] for n in notes} == set(users)
        # nothing the worker sent was refused (CLIENT SETINFO, which redis-py tries on
        # connect and does without, exists from Redis 7.2 on and is not granted)
        refused = [
            e for e in acl_refusals(acl_redis, "stream-worker")
            if e.get("object") != "client|setinfo"
        ]
        assert refused == []
    finally:
        reader.close()


def test_the_reader_user_reads_and_subscribes_and_is_refused_writes(
    acl_redis: stack.RedisServer,
) -> None:
    admin = client_as(acl_redis, "stream-admin")
    admin.set("reco:u1", b'{"user_id": "u1", "seq": 1, "items": []}')
    admin.set("similar:t1", b'{"track_id": "t1", "items": []}')
    admin.set(checkpoint_key("app"), b"model bytes")
    admin.hset("track:t1", mapping={"name": "Airbag", "artist": "Radiohead"})
    admin.close()
    reader = client_as(acl_redis, "stream-reader")
    try:
        assert reader.ping()
        assert reader.get("reco:u1") is not None and reader.get("similar:t1") is not None
        assert reader.get("reco:missing") is None
        assert reader.hgetall("track:t1") == {b"name": b"Airbag", b"artist": b"Radiohead"}
        assert reader.hmget("track:t1", "name") == [b"Airbag"]
        subscribe_confirmed(reader, "reco-updates").close()
        writes: list[Callable[[], Any]] = [
            lambda: reader.set("reco:u1", b"{}"),
            lambda: reader.set("similar:t1", b"{}"),
            lambda: reader.delete("reco:u1"),
            lambda: reader.expire("reco:u1", 1),
            lambda: reader.append("reco:u1", b"x"),
            lambda: reader.rename("reco:u1", "reco:u2"),
            lambda: reader.hset("reco:u9", "x", "1"),
            lambda: reader.hset("track:t1", "name", "x"),
            lambda: reader.hincrby("track:t1", "plays", 1),
            lambda: reader.publish("reco-updates", b"{}"),
            lambda: reader.eval("return 1", 0),
            lambda: reader.script_load("return 1"),
            lambda: reader.flushall(),
            lambda: reader.config_set("maxmemory", "1"),
        ]
        assert_refused(writes)
        # not even reads beyond what it needs: checkpoints, other keys, listing keys
        reads: list[Callable[[], Any]] = [
            lambda: reader.get(checkpoint_key("app")),
            lambda: reader.get("other:key"),
            lambda: reader.keys("*"),
            lambda: reader.scan(0),
        ]
        assert_refused(reads)
        assert_subscribe_refused(reader, "other-channel")
    finally:
        reader.close()
    check = client_as(acl_redis, "stream-admin")
    try:
        assert check.get("reco:u1") == b'{"user_id": "u1", "seq": 1, "items": []}'
        assert check.exists("reco:u2", "reco:u9") == 0
    finally:
        check.close()


def test_the_worker_user_may_do_its_job_and_nothing_else(
    acl_redis: stack.RedisServer,
) -> None:
    worker = client_as(acl_redis, "stream-worker")
    try:
        # granted: each command the worker sends, on its own key families
        assert worker.set("reco:u1", b"{}") and worker.set("similar:t1", b"{}")
        assert worker.get("reco:u1") == b"{}" and worker.type("reco:u1") == b"string"
        sha = worker.script_load(WRITE_SCRIPT)
        doc = b'{"seq": 2, "lineage": "app"}'
        assert worker.evalsha(sha, 1, "reco:u2", 2, doc, 60, "reco-updates", b"{}", "app") == 1
        assert worker.publish("reco-updates", b"{}") == 0
        assert worker.delete("reco:u2") == 1
        upload = same_slot_key(checkpoint_key("app"), "upload:1")
        assert worker.set(upload, b"ab", ex=60) and worker.append(upload, b"c") == 3
        with worker.pipeline(transaction=True) as tx:
            tx.rename(upload, checkpoint_key("app"))
            tx.persist(checkpoint_key("app"))
            tx.execute()
        assert worker.get(checkpoint_key("app")) == b"abc" and worker.ping()
        # the track catalogue: its hash commands, on its keys only
        assert worker.hset("track:t1", mapping={"name": "Airbag", "artist": "Radiohead"}) == 2
        assert worker.hsetnx("track:t1", "first_seen", 1) == 1
        assert worker.hincrby("track:t1", "plays", 3) == 3 and worker.expire("track:t1", 60)
        assert worker.hmget("track:t1", "name", "artist", "album") == [b"Airbag", b"Radiohead",
                                                                        None]
        refused: list[Callable[[], Any]] = [
            lambda: worker.get("similar:t1"),  # similar lists are written, never read
            lambda: worker.set("other:key", b"x"),
            lambda: worker.get("other:key"),
            lambda: worker.publish("other-channel", b"x"),
            lambda: worker.keys("*"),
            lambda: worker.scan(0),
            lambda: worker.flushall(),
            lambda: worker.flushdb(),
            lambda: worker.config_get("*"),
            lambda: worker.eval("return 1", 0),  # it loads its script and uses EVALSHA
            lambda: worker.hset("reco:u1", "x", "1"),
            lambda: worker.expire("reco:u1", 1),
            lambda: worker.hset("other:key", "x", "1"),
            lambda: worker.get("track:t1"),  # the selector grants hash commands only
            lambda: worker.hgetall("track:t1"),
            lambda: worker.delete("track:t1"),
            lambda: worker.acl_list(),
            lambda: worker.script_flush(),
        ]
        assert_refused(refused)
        assert_subscribe_refused(worker, "reco-updates")  # it publishes, never listens
    finally:
        worker.close()


def test_the_default_user_is_off(acl_redis: stack.RedisServer) -> None:
    anonymous = redis.Redis(port=acl_redis.port, socket_timeout=5)
    try:
        with pytest.raises(AuthenticationError):
            anonymous.get("reco:u1")
    finally:
        anonymous.close()
    wrong = redis.Redis(
        port=acl_redis.port, username="stream-worker", password="not-it", socket_timeout=5
    )
    try:
        with pytest.raises(AuthenticationError):
            wrong.ping()
    finally:
        wrong.close()


def test_a_refused_publish_writes_the_documents_and_counts_once_per_flush(
    acl_redis: stack.RedisServer,
) -> None:
    """Review finding 6: the worker user may not PUBLISH on a channel its ACL lacks. The
    guard script still writes every document; the flush counts one ``publish_refused``
    (not a dropped key per document) and nothing is retried."""
    import asyncio

    from stream.adapters.redis_store import PendingWrite, RecoWriter, connect_async

    events: list[tuple[str, str, bool]] = []
    flushed: list[list[int]] = []

    async def go() -> None:
        client = connect_async(f"redis://127.0.0.1:{acl_redis.port}/0",
                               password=PASSWORDS["stream-worker"], username="stream-worker")
        writer = RecoWriter(
            client, ttl_s=60, channel="not-the-workers-channel", flush_interval_ms=0,
            on_key_error=lambda kind, reason, dropped: events.append((kind, reason, dropped)),
            on_flush=lambda batch, results, s: flushed.append(results),
        )
        for i in range(5):
            doc = f'{{"seq": 1, "lineage": "app", "n": {i}}}'.encode()
            writer.submit(PendingWrite(f"reco:pub{i}", 1, doc, b"{}", 0, None, 0.0, "app"))
        writer.start()
        await asyncio.wait_for(writer.drained(), 10)
        await writer.stop()
        await client.aclose()

    asyncio.run(go())
    assert flushed == [[1] * 5]
    assert events == [("publish", "publish_refused", False)]
    admin = client_as(acl_redis, "stream-admin")
    try:
        assert [admin.get(f"reco:pub{i}") is not None for i in range(5)] == [True] * 5
        # the server refused the PUBLISH (ACL log: a channel refusal), and nothing else
        refusals = acl_refusals(acl_redis, "stream-worker")
        assert refusals and {e["reason"] for e in refusals} == {"channel"}
    finally:
        admin.close()
