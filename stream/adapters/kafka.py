"""Thin aiokafka helpers shared by the worker start-up, the producer, tests and benchmarks:
client settings from :class:`Settings`, topic creation, and a bounded topic reader."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
)

from stream.config import Settings
from stream.errors import ConfigError, StreamError
from stream.faustx.kafka_client import cluster_metadata

logger = logging.getLogger(__name__)


class KafkaUnavailable(StreamError):
    """The broker could not be reached."""


def client_kwargs(settings: Settings) -> dict[str, Any]:
    """aiokafka connection settings (bootstrap, security) for every client we build."""
    kw: dict[str, Any] = {"bootstrap_servers": settings.kafka_bootstrap}
    proto = settings.kafka_security_protocol
    if proto != "PLAINTEXT":
        kw["security_protocol"] = proto
    if proto in ("SSL", "SASL_SSL"):
        kw["ssl_context"] = ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
    if proto.startswith("SASL"):
        kw["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kw["sasl_plain_username"] = settings.kafka_sasl_username
        kw["sasl_plain_password"] = settings.kafka_sasl_password
    return kw


#: configuration of the control topic when the worker creates it
CONTROL_TOPIC_CONFIGS: dict[str, str] = {"message.timestamp.type": "LogAppendTime"}


def signals_topic(settings: Settings) -> str:
    """The topic where workers share item-side learning signals (stream.processing.replication)."""
    return f"{settings.app_id}-track-signals"


async def ensure_topics(settings: Settings, timeout_s: float = 30.0) -> int:
    """Create the plays and dead-letter topics if missing; return the plays partition count.

    An existing plays topic keeps its partition count (the session table is co-partitioned
    with whatever it has); a differing ``partitions`` setting is logged, not enforced.
    """
    admin = AIOKafkaAdminClient(**client_kwargs(settings), request_timeout_ms=10_000)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await admin.start()
            break
        except KafkaConnectionError as exc:
            if time.monotonic() > deadline:
                raise KafkaUnavailable(
                    f"cannot reach Kafka at {settings.kafka_bootstrap} "
                    f"(setting kafka_bootstrap): {exc}"
                ) from exc
            await asyncio.sleep(1)
    try:
        names = [
            settings.plays_topic,
            settings.dlq_topic,
            settings.control_topic,
            signals_topic(settings),
        ]
        denied: set[str] = set()
        existing = await _partition_counts(admin, names, denied)
        if denied:  # a least-privilege principal (docs/reliability.md): the admin creates them
            logger.info("not authorized to describe %s; not creating them", sorted(denied))
        # the control topic must be co-partitioned with plays (same key -> same partition)
        plays_n = existing.get(settings.plays_topic, settings.partitions)
        topic_configs = (
            {"min.insync.replicas": str(settings.min_insync_replicas)}
            if settings.min_insync_replicas
            else {}
        )
        to_create = [
            NewTopic(
                name,
                plays_n if name == settings.control_topic else settings.partitions,
                settings.replication_factor,
                # the broker stamps control records: a command's freshness is checked
                # against a time no producer can choose (stream.processing.control.ControlGate)
                topic_configs=topic_configs
                | (CONTROL_TOPIC_CONFIGS if name == settings.control_topic else {}),
            )
            for name in names
            if name not in existing and name not in denied
        ]
        if to_create:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(to_create)
            logger.info("created topics %s", [t.name for t in to_create])
        for _ in range(50):
            counts = await _partition_counts(admin, [settings.plays_topic])
            if settings.plays_topic in counts:
                break
            await asyncio.sleep(0.2)
        else:
            raise KafkaUnavailable(f"topic {settings.plays_topic} did not appear after creation")
        n = counts[settings.plays_topic]
        control_n = (await _partition_counts(admin, [settings.control_topic])).get(
            settings.control_topic
        )
        if control_n is not None and control_n != n:
            raise ConfigError(
                f"control topic {settings.control_topic} has {control_n} partitions but "
                f"{settings.plays_topic} has {n}; they must be co-partitioned "
                "(setting control_topic)"
            )
        if n != settings.partitions:
            logger.warning(
                "topic %s has %d partitions (setting partitions=%d); using %d",
                settings.plays_topic,
                n,
                settings.partitions,
                n,
            )
        return n
    finally:
        await admin.close()


async def existing_topics(settings: Settings, names: list[str]) -> set[str]:
    """Which of ``names`` exist (one describe request; unknown on errors: reported missing)."""
    if not names:
        return set()
    admin = AIOKafkaAdminClient(**client_kwargs(settings), request_timeout_ms=10_000)
    try:
        await admin.start()
        return set(await _partition_counts(admin, names))
    except KafkaError:
        return set()
    finally:
        await admin.close()


async def _partition_counts(
    admin: AIOKafkaAdminClient, topics: list[str], denied: set[str] | None = None
) -> dict[str, int]:
    """Partition count of each topic that exists; names this principal may not describe
    go into ``denied`` (when given)."""
    out: dict[str, int] = {}
    try:
        described = await admin.describe_topics(topics)
    except KafkaError:
        return out
    for t in described:
        if denied is not None and t.get("error_code") == TopicAuthorizationFailedError.errno:
            denied.add(t["topic"])
        if t.get("error_code", 0) == 0 and t.get("partitions"):
            out[t["topic"]] = len(t["partitions"])
    return out


def make_producer(settings: Settings, **extra: Any) -> AIOKafkaProducer:
    kw = client_kwargs(settings)
    kw.setdefault("acks", "all" if settings.kafka_acks == "all" else int(settings.kafka_acks))
    kw.setdefault("linger_ms", 5)
    kw.setdefault("enable_idempotence", settings.kafka_acks == "all")  # idempotence needs all
    kw.update(extra)
    return AIOKafkaProducer(**kw)


async def read_topic(
    settings: Settings, topic: str, *, max_messages: int, timeout_s: float
) -> list[Any]:
    """Read a topic from the beginning (no consumer group) until ``max_messages`` arrive or
    ``timeout_s`` passes. Returns aiokafka ConsumerRecords."""
    consumer = AIOKafkaConsumer(**client_kwargs(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        for _ in range(50):
            if parts:
                break
            cluster = await cluster_metadata(consumer)
            parts = cluster.partitions_for_topic(topic)
            if not parts:
                await asyncio.sleep(0.1)
        if not parts:
            raise KafkaUnavailable(f"topic {topic} has no partitions (does it exist?)")
        tps = [TopicPartition(topic, p) for p in sorted(parts or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < max_messages and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                out.extend(records)
        return out
    finally:
        await consumer.stop()


async def read_partition_since(
    settings: Settings,
    topic: str,
    partition: int,
    since_ms: int,
    until_offset: int,
    *,
    max_records: int = 100_000,
    timeout_s: float = 10.0,
) -> list[Any]:
    """The records of one partition from the first at or after ``since_ms`` (the broker's
    time index) up to, not including, ``until_offset``; bounded by count and time (raises
    :class:`KafkaUnavailable` when the time runs out first)."""
    tp = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(**client_kwargs(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        found = await consumer.offsets_for_times({tp: since_ms})
        start = found.get(tp)
        if start is None or start.offset >= until_offset:
            return []
        consumer.seek(tp, start.offset)
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < max_records:
            if time.monotonic() > deadline:
                raise KafkaUnavailable(f"reading {topic}[{partition}] back timed out")
            batch = await consumer.getmany(tp, timeout_ms=200, max_records=1000)
            for r in batch.get(tp, []):
                if r.offset >= until_offset:
                    return out
                out.append(r)
            if await consumer.position(tp) >= until_offset:
                return out
        return out
    finally:
        await consumer.stop()
