"""Least privilege on a real secured broker (SASL_SSL with SCRAM-SHA-512, KRaft
StandardAuthorizer, deny by default), started through the project's stack code
(`stream stack up kafka-secure`, stream.tools.stack_secure) from configs/kafka/secure/: the worker
runs end to end with exactly the ACLs of acls.json, and every other principal is refused
where it must be.

The broker is private to this module (its own state dir and free ports) and stopped at
teardown; Redis is the shared stack's (unique key prefix per test).
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import GroupAuthorizationFailedError, TopicAuthorizationFailedError

from stream.adapters.kafka import client_kwargs, ensure_topics, make_producer, read_topic
from stream.adapters.redis_store import RecoReader
from stream.config import Settings
from stream.core.events import PlayEvent
from stream.tools import stack
from stream.tools import stack_secure as ks

from .conftest import free_port, produce, settings_env, unique_settings, wait_until

pytestmark = pytest.mark.integration

NOT_ADMIN = ("worker", "producer", "reader")


def stack_cli(env: dict[str, str], *args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stream.tools.cli", "stack", *args],
        env=env, capture_output=True, text=True, timeout=240,
    )
    if proc.returncode != 0:
        pytest.fail(f"stream stack {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ks.SecureKafka]:
    """The secured broker, started and stopped by `stream stack up kafka-secure` / a bare
    `stream stack down` in a private state dir on free ports (one per module: a second JVM
    costs ~10 s and ~0.5 GB)."""
    state = tmp_path_factory.mktemp("kafka-secure")
    kafka = ks.SecureKafka.from_stack(
        stack.private_config(state), free_port(), free_port(), tls=True
    )
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("STREAM_") or k == "STREAM_CACHE_DIR"}
    env |= {
        "STREAM_STATE_DIR": str(state),
        "STREAM_STACK_KAFKA_SECURE_PORT": str(kafka.port),
        "STREAM_STACK_KAFKA_SECURE_CONTROLLER_PORT": str(kafka.controller_port),
        "STREAM_STACK_KAFKA_SECURE_TLS": "1",
    }
    try:
        stack_cli(env, "up", "kafka-secure")
        assert ks.running(kafka) is not None and ks.ready(kafka)
        yield kafka
    finally:
        stack_cli(env, "down")
        if ks.running(kafka) is not None:  # never leave a JVM behind, even on a failure
            ks.stop(kafka)
            pytest.fail("`stream stack down` did not stop kafka-secure")


@pytest.fixture
def app(services: stack.StackConfig, secure_kafka: ks.SecureKafka) -> Settings:
    """Unique app/topic names for this test, topics created and ACLs granted by the admin."""
    s = unique_settings(services, prefix="acl")
    ks.grant(secure_kafka, s)
    return s


def as_(kafka: ks.SecureKafka, principal: str, s: Settings) -> Settings:
    return ks.client_settings(kafka, principal, s)


async def send(s: Settings, topic: str, value: bytes, key: bytes = b"u1") -> None:
    # a principal without WRITE anywhere cannot get an idempotent producer id at all
    # (ClusterAuthorizationFailedError); plain producers reach the per-topic check
    producer = make_producer(s, enable_idempotence=s.kafka_sasl_username != "reader",
                             request_timeout_ms=10_000)
    try:
        await asyncio.wait_for(producer.start(), 30)
        await asyncio.wait_for(producer.send_and_wait(topic, value, key=key), 30)
    finally:
        await producer.stop()


async def consume_one(s: Settings, topic: str, group: str | None) -> bytes | None:
    """One record of ``topic`` from the beginning, via ``group`` (subscribe) or by
    assignment (no group); None if none arrives within 60 s (a group join on a loaded box
    takes seconds; every caller expects a record or a refusal, never None)."""
    kw = client_kwargs(s)
    if group is None:
        consumer = AIOKafkaConsumer(**kw, enable_auto_commit=False)
    else:
        consumer = AIOKafkaConsumer(
            topic, **kw, group_id=group, auto_offset_reset="earliest", enable_auto_commit=False
        )
    try:
        await asyncio.wait_for(consumer.start(), 30)
        if group is None:
            tps = [TopicPartition(topic, p) for p in range(s.partitions)]
            consumer.assign(tps)
            await asyncio.wait_for(consumer.seek_to_beginning(*tps), 30)
        try:
            record = await asyncio.wait_for(consumer.getone(), 60)
        except TimeoutError:
            return None
        return bytes(record.value)
    finally:
        await consumer.stop()


def forget_cli(s: Settings, user: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream.tools.cli", "forget", user],
        env=settings_env(s), capture_output=True, text=True, timeout=90,
    )


def broker_log(kafka: ks.SecureKafka) -> Path:
    return kafka.home / "logs" / "server.log"


def denials(text: str, principal: str) -> list[str]:
    return [ln for ln in text.splitlines() if f"Principal = User:{principal} is Denied" in ln]


def test_worker_runs_end_to_end_with_exactly_its_acls(
    secure_kafka: ks.SecureKafka,
    app: Settings,
    worker_factory: Callable[..., object],
) -> None:
    bindings = ks.render_acls(ks.load_acl_config(), ks.acl_names(app))
    want = {b for b in bindings if b.principal == "worker"}
    # what the broker enforces for this app is what acls.json says, nothing more (the
    # module's broker also holds the other tests' apps, under their own unique names)
    held = asyncio.run(ks.describe_acls(secure_kafka, "worker"))
    mine = {app.app_id, f"{app.app_id}-", app.plays_topic, app.dlq_topic, app.control_topic}
    assert {b for b in held if b.name in mine} == want
    assert not any(b.operation in ("all", "alter", "delete") for b in held)

    log_start = broker_log(secure_kafka).stat().st_size
    worker_s = as_(secure_kafka, "worker", app)
    worker = worker_factory(worker_s)
    now = int(time.time() * 1000) - 60_000  # plays of the last minute
    users = [f"u{i}" for i in range(5)]
    events: list[PlayEvent | bytes] = [
        PlayEvent(u, f"t{(i + j) % 7}", now + 1000 * j, 30_000, f"{u}-e{j}")
        for i, u in enumerate(users)
        for j in range(4)
    ]
    events.append(b'{"user_id": "u0", "track_id": 12')  # malformed -> dead letters
    assert produce(as_(secure_kafka, "producer", app), events) == len(events)

    reader = RecoReader(app.redis_url, password=app.redis_password, prefix=app.redis_prefix)
    try:
        wait_until(
            lambda: all((d := reader.get(u)) is not None and d.seq == 4 for u in users),
            90,
            what="every listener's recommendations from the worker principal",
        )
        # `stream forget`: refused as the producer, carried out when the admin sends it
        refused = forget_cli(as_(secure_kafka, "producer", app), "u0")
        assert refused.returncode != 0
        assert "TopicAuthorizationFailedError" in refused.stderr
        assert reader.get("u0") is not None
        assert forget_cli(as_(secure_kafka, "admin", app), "u0").returncode == 0
        wait_until(lambda: reader.get("u0") is None, 60, what="u0 forgotten by the worker")
        assert reader.get("u1") is not None
    finally:
        keys = list(reader.client.scan_iter(match=f"{app.redis_prefix}*", count=1000))
        keys += list(reader.client.scan_iter(match=f"{app.similar_prefix}*", count=1000))
        keys += list(reader.client.scan_iter(match=f"model:{app.app_id}*", count=1000))
        if keys:
            reader.client.delete(*keys)
        reader.close()

    # the dead letter, read by the reader principal (its one topic)
    dead = asyncio.run(read_topic(as_(secure_kafka, "reader", app), app.dlq_topic,
                                  max_messages=1, timeout_s=30))
    assert len(dead) == 1 and b'"track_id": 12' in dead[0].value
    assert dict(dead[0].headers)["dlq.reason"]
    # the session changelog the worker wrote under its prefixed ACL
    changelog = f"{app.app_id}-sessions-changelog"
    records = wait_until(
        lambda: asyncio.run(read_topic(as_(secure_kafka, "admin", app), changelog,
                                       max_messages=len(users), timeout_s=5)),
        60,
        what=f"records on {changelog}",
    )
    assert {r.key for r in records} <= {f'"{u}"'.encode() for u in users}

    assert worker.stop() == 0  # type: ignore[attr-defined]
    # the worker never asked for anything acls.json does not give it
    text = broker_log(secure_kafka).read_bytes()[log_start:].decode(errors="replace")
    assert denials(text, "worker") == []
    # `stream produce` as the producer does not even try to create the topics it cannot see
    assert [d for d in denials(text, "producer") if "operation = CREATE" in d] == []


def test_producer_may_write_plays_only(secure_kafka: ks.SecureKafka, app: Settings) -> None:
    producer = as_(secure_kafka, "producer", app)
    asyncio.run(send(producer, app.plays_topic, b"play"))
    assert asyncio.run(consume_one(as_(secure_kafka, "admin", app), app.plays_topic, None)) == (
        b"play"
    )
    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(send(producer, app.control_topic, b"forget"))
    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(send(producer, app.dlq_topic, b"junk"))
    # it may not read back what it wrote: not by assignment, not through the worker's group
    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(consume_one(producer, app.plays_topic, None))
    with pytest.raises(GroupAuthorizationFailedError):
        asyncio.run(consume_one(producer, app.plays_topic, app.app_id))


def test_worker_is_refused_outside_its_rights(secure_kafka: ks.SecureKafka, app: Settings) -> None:
    worker = as_(secure_kafka, "worker", app)
    asyncio.run(send(as_(secure_kafka, "producer", app), app.plays_topic, b"play"))
    assert asyncio.run(consume_one(worker, app.plays_topic, app.app_id)) == b"play"
    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(send(worker, app.control_topic, b"forget"))
    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(send(worker, app.plays_topic, b"forged play"))
    # another app's group and topics (which its prefix does not cover); the other app's
    # topics exist, so the refusal is the ACLs' doing. (Its ACLs are not granted: they would
    # go to the same `worker` principal -- one principal per app id, see docs/reliability.md.)
    other = unique_settings(stack.StackConfig.from_env(), prefix="other")
    asyncio.run(ensure_topics(as_(secure_kafka, "admin", other)))
    with pytest.raises(GroupAuthorizationFailedError):
        asyncio.run(consume_one(worker, app.plays_topic, other.app_id))
    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(send(worker, f"{other.app_id}-track-signals", b"signal"))
    log = broker_log(secure_kafka).read_text(errors="replace")
    assert re.search(
        rf"Principal = User:worker is Denied operation = DESCRIBE .* "
        rf"resource = Group:LITERAL:{other.app_id} for request = FindCoordinator",
        log,
    )


def test_only_admin_may_write_control(secure_kafka: ks.SecureKafka, app: Settings) -> None:
    for principal in NOT_ADMIN:
        with pytest.raises(TopicAuthorizationFailedError):
            asyncio.run(send(as_(secure_kafka, principal, app), app.control_topic, b"forget"))
        held = asyncio.run(ks.describe_acls(secure_kafka, principal))
        assert not [b for b in held if b.name == app.control_topic and b.operation != "read"]
    # the reader cannot even read control commands (through a group it may use)
    reader_group = f"{app.app_id}-dlq-reader-1"
    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(consume_one(as_(secure_kafka, "reader", app), app.control_topic, reader_group))
    asyncio.run(send(as_(secure_kafka, "admin", app), app.control_topic, b"forget", key=b"u9"))
    # ... and the worker, which must act on them, reads what the admin wrote
    got = asyncio.run(consume_one(as_(secure_kafka, "worker", app), app.control_topic, None))
    assert got == b"forget"


def test_no_listener_takes_an_unauthenticated_or_wrong_client(
    secure_kafka: ks.SecureKafka,
) -> None:
    """Both listeners are up, and neither lets a client in without TLS and the right SCRAM
    credentials: no PLAINTEXT (User:ANONYMOUS), no SASL without TLS, no wrong password, no
    PLAIN on the client listener, and no client identity on the controller listener (it
    takes the broker only)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaConnectionError

    assert secure_kafka.protocol == "SASL_SSL"
    creds = ks.credentials(secure_kafka)
    trusted = ssl.create_default_context(cafile=str(secure_kafka.ca_file))

    async def metadata(port: int, **kw: Any) -> object:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=5000, **kw
        )
        try:
            await asyncio.wait_for(admin.start(), 15)
            return await asyncio.wait_for(admin.describe_cluster(), 15)
        finally:
            await admin.close()

    def sasl(user: str, password: str, mechanism: str = ks.MECHANISM,
             tls: bool = True) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "security_protocol": "SASL_SSL" if tls else "SASL_PLAINTEXT",
            "sasl_mechanism": mechanism, "sasl_plain_username": user,
            "sasl_plain_password": password,
        }
        return kw | ({"ssl_context": trusted} if tls else {})

    client, controller = secure_kafka.port, secure_kafka.controller_port
    assert stack._port_open(client) and stack._port_open(controller)
    assert asyncio.run(metadata(client, **sasl("worker", creds["worker"])))
    wrong = "wr0ng-scram-pw"
    refused: list[tuple[int, dict[str, Any]]] = [
        (client, {}),
        (controller, {}),
        (client, sasl("worker", creds["worker"], tls=False)),
        (client, sasl("worker", wrong)),
        (client, sasl("admin", creds["admin"], "PLAIN")),
        (controller, sasl("admin", creds["admin"], tls=False)),
        (controller, sasl("admin", creds["admin"], "PLAIN", tls=False)),
    ]
    for port, kw in refused:
        with pytest.raises(KafkaConnectionError) as err:
            asyncio.run(metadata(port, **kw))
        assert wrong not in repr(err.value) and creds["admin"] not in repr(err.value)
    gc.collect()  # a connection left open by a refused client shows up here, not later
