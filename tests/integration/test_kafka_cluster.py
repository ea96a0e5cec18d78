"""The worker on a real 3-broker Kafka KRaft cluster, started through the project's own
stack code (stream.tools.stack_cluster) on ports 29092-29094 (controllers 29192-29194), or
from STREAM_STACK_KAFKA_CLUSTER_PORT / STREAM_STACK_KAFKA_CLUSTER_CONTROLLER_PORT where set.

Redis is the shared single node. The cluster is started once for the module and stopped at
teardown; a cluster that does not start FAILS the tests.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from stream.adapters.kafka import signals_topic
from stream.adapters.redis_store import RecoReader
from stream.config import Settings
from stream.errors import StackError
from stream.tools import stack, stack_cluster
from stream.tools.datasets import load_events

from .conftest import produce, unique_settings, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def kafka_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[stack_cluster.ClusterConfig]:
    cc = stack_cluster.private_cluster_config(
        tmp_path_factory.mktemp("kafka-cluster"),
        **stack_cluster.ports_from_env(kafka_port=29092, controller_port=29192),
    )
    try:
        stack_cluster.start_kafka_cluster(cc)
    except StackError as exc:
        stack_cluster.stop_kafka_cluster(cc)
        pytest.fail(f"the Kafka cluster did not start through stream.tools.stack_cluster: {exc}")
    yield cc
    stack_cluster.stop_kafka_cluster(cc)


async def describe(bootstrap: str, prefix: str) -> dict[str, tuple[list[int], str]]:
    """Topic -> (replica count of each partition, min.insync.replicas) for the topics
    whose name starts with ``prefix``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(prefix)]
        described = await admin.describe_topics(names)
        configs = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, n) for n in names]
        )
        isr: dict[str, str] = {}
        for response in configs:
            for resource in response.resources:
                name, entries = resource[3], resource[4]
                isr[name] = next(e[1] for e in entries if e[0] == "min.insync.replicas")
        return {
            t["topic"]: ([len(p["replicas"]) for p in t["partitions"]], isr[t["topic"]])
            for t in described
        }
    finally:
        await admin.close()


def test_worker_on_three_brokers_rf3_acks_all_survives_a_broker_loss(
    services: stack.StackConfig,
    kafka_cluster: stack_cluster.ClusterConfig,
    worker_factory,
    datasets_dir: Path,
) -> None:
    s: Settings = unique_settings(
        services,
        prefix="kc",
        kafka_bootstrap=kafka_cluster.bootstrap,
        replication_factor=3,
        min_insync_replicas=2,
        kafka_acks="all",
    )
    events = load_events(datasets_dir / "spotify-mssd-sample", "spotify")[:600]
    first, second = events[:300], events[300:]
    reader = RecoReader(s.redis_url, password=s.redis_password, prefix=s.redis_prefix)

    def seqs(expected: dict[str, int]) -> dict[str, int | None]:
        return {u: (d.seq if (d := reader.get(u)) else None) for u in expected}

    try:
        worker = worker_factory(s)
        assert produce(s, first) == len(first)
        expected = dict(Counter(e.user_id for e in first))
        wait_until(lambda: seqs(expected) == expected, 120, what="lists after the first plays")

        # every topic of this app (plays, DLQ, control, signals, Faust's changelog) keeps
        # 3 copies of each partition and takes an acks=all write with 2 in sync
        tag = s.plays_topic.removesuffix("-plays")  # every name of this test starts with it
        topics: dict[str, Any] = asyncio.run(describe(kafka_cluster.bootstrap, tag))
        for name in (s.plays_topic, s.dlq_topic, s.control_topic, signals_topic(s)):
            assert name in topics, sorted(topics)
        changelogs = [t for t in topics if t.endswith("-changelog")]
        assert changelogs, sorted(topics)
        for name, (replicas, min_isr) in topics.items():
            assert replicas and set(replicas) == {3}, (name, replicas)
            assert min_isr == "2", (name, min_isr)

        # SIGKILL one broker: 2 of 3 replicas stay in sync, so acks=all writes (the
        # producer's and the worker's changelog) go on, and the worker keeps up
        victim = stack.kill_now(kafka_cluster.base, stack_cluster.kafka_node(2), "kafka")
        assert victim is not None
        # the controller fences it after broker.session.timeout.ms (9 s): the cluster then
        # reports 2 brokers and the partitions it led have new leaders, ISR 2
        wait_until(
            lambda: stack_cluster.kafka_cluster_brokers(kafka_cluster.bootstrap) == 2,
            60,
            interval=1,
            what="the cluster to see the killed broker gone",
        )
        assert produce(s, second) == len(second)
        expected = dict(Counter(e.user_id for e in events))
        wait_until(lambda: seqs(expected) == expected, 180, what="lists with one broker dead")
        assert worker.proc is not None and worker.proc.poll() is None
        assert worker.metric_value("stream_events_total", outcome="processed") == len(events)
        # the broker comes back and rejoins (its replicas catch up); the worker then stops
        # cleanly at teardown (with a broker still dead, a graceful stop outlasted 40 s)
        stack_cluster.start_kafka_node(kafka_cluster, 2)
        wait_until(
            lambda: stack_cluster.kafka_cluster_brokers(kafka_cluster.bootstrap) == 3,
            90,
            interval=1,
            what="the killed broker back in the cluster",
        )
    finally:
        for key in reader.client.scan_iter(match=f"{s.redis_prefix}*"):
            reader.client.delete(key)
        reader.client.delete(f"model:{s.app_id}")
        reader.close()


def test_kafka_leader_kill_drill_short(
    services: stack.StackConfig,
    kafka_cluster: stack_cluster.ClusterConfig,
    worker_factory,
) -> None:
    """The CI variant of ``python -m load_tests.faults kafka-leader-kill``: SIGKILL the
    broker leading the most plays partitions under 300 plays/s, restart it 10 s later."""
    from load_tests.cluster_faults import kafka_leader_kill

    s = unique_settings(services, prefix="lk")
    report = kafka_leader_kill(
        s, worker_factory, kafka_cluster, rate=300, before_s=6, down_s=10, after_s=6, users=100
    )
    assert report["plays_partitions_led_by_killed_node"] >= 1, report
    assert report["worker_alive_while_broker_down"] and report["worker_alive"], report
    assert report["lost"] == 0 and report["double_applied"] == 0, report
    assert report["users_missing"] == 0, report
