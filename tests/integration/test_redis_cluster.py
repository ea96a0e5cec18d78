"""The worker on a real Redis Cluster (3 primaries + 3 replicas), started through the
project's own stack code (stream.tools.stack_cluster) on ports 17000-17005 (buses 27000-27005),
or from STREAM_STACK_REDIS_CLUSTER_PORT where set.

Kafka is the shared single broker; Redis is only the cluster. The module's cluster is
started once and stopped at teardown; a cluster that does not start FAILS the tests.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from redis.crc import key_slot

from stream.adapters.redis_store import (
    PendingWrite,
    RecoReader,
    RecoWriter,
    checkpoint_key,
    connect_async,
)
from stream.config import Settings
from stream.errors import StackError
from stream.tools import stack, stack_cluster
from stream.tools.datasets import load_events

from .conftest import produce, settings_env, unique_settings, wait_subscribed, wait_until

pytestmark = pytest.mark.integration

REDIS_CLUSTER_PORT = 17000


@pytest.fixture(scope="module")
def redis_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[stack_cluster.ClusterConfig]:
    cc = stack_cluster.private_cluster_config(
        tmp_path_factory.mktemp("redis-cluster"),
        **stack_cluster.ports_from_env(redis_port=REDIS_CLUSTER_PORT),
    )
    try:
        stack_cluster.start_redis_cluster(cc)
    except StackError as exc:
        stack_cluster.stop_redis_cluster(cc)
        pytest.fail(f"the Redis Cluster did not start through stream.tools.stack_cluster: {exc}")
    yield cc
    stack_cluster.stop_redis_cluster(cc)


def cluster_settings(
    services: stack.StackConfig, cc: stack_cluster.ClusterConfig, **overrides: Any
) -> Settings:
    tag_prefix = {"catalog_prefix": f"rc{uuid.uuid4().hex[:6]}:track:"}
    return unique_settings(
        services, prefix="rc", redis_url=cc.redis_url, **(tag_prefix | overrides)
    )


def cluster_reader(s: Settings) -> RecoReader:
    return RecoReader(
        s.redis_url, prefix=s.redis_prefix, similar_prefix=s.similar_prefix,
        channel=s.notify_channel,
    )  # fmt: skip


def primaries(cc: stack_cluster.ClusterConfig) -> dict[int, str]:
    """Port -> node id of each primary."""
    nodes = redis.Redis(port=cc.redis_port).cluster("nodes")
    return {
        int(addr.split("@")[0].split(":")[1]): info["node_id"]
        for addr, info in nodes.items()
        if "master" in info["flags"]
    }


def test_worker_writes_lists_notifications_and_checkpoints_on_redis_cluster(
    services: stack.StackConfig,
    redis_cluster: stack_cluster.ClusterConfig,
    worker_factory,
    datasets_dir: Path,
) -> None:
    s = cluster_settings(services, redis_cluster, checkpoint_interval_s=2.0)
    events = load_events(datasets_dir / "spotify-mssd-sample", "spotify")[:400]
    expected = dict(Counter(e.user_id for e in events))
    reader = cluster_reader(s)
    notes: list[dict[str, Any]] = []

    def listen() -> None:
        for note in reader.updates(timeout_s=20):
            notes.append(note)
            if {n["user_id"] for n in notes} >= set(expected):
                return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    # the reader's subscription counted by the server (summed over the nodes)
    wait_subscribed(reader.client, s.notify_channel)
    worker = worker_factory(s)
    assert produce(s, events) == len(events)

    def seqs() -> dict[str, int | None]:
        return {u: (d.seq if (d := reader.get(u)) else None) for u in expected}

    wait_until(lambda: seqs() == expected, 90, what=f"seq per user == {expected}")
    # the lists really are spread over the shards (the flushes were split by node)
    client = reader.client
    owners = {
        client.get_node_from_key(f"{s.redis_prefix}{u}").port  # type: ignore[attr-defined]
        for u in expected
    }
    assert len(owners) >= 2 and owners <= set(primaries(redis_cluster)), owners
    for user in expected:
        doc = reader.get(user)
        assert doc is not None and doc.items and doc.session["plays_total"] == expected[user]
    # notifications (classic PUBLISH inside the guard script, forwarded to every node)
    listener.join(30)
    assert {n["user_id"] for n in notes} == set(expected)
    assert all(n["seq"] <= expected[n["user_id"]] for n in notes)
    # the checkpoint: uploaded in pieces to a key of its slot, renamed in place, no expiry
    key = checkpoint_key(s.app_id)
    wait_until(lambda: client.exists(key), 60, what=f"checkpoint {key} in the cluster")
    assert client.ttl(key) == -1
    assert worker.metric_value("stream_checkpoints_total", result="written") >= 1
    assert worker.metric_value("stream_redis_write_errors_total") == 0
    # the track catalogue's packed commands went through the cluster pipeline too
    played = {e.track_id for e in events}
    wait_until(
        lambda: sum(client.exists(f"{s.catalog_prefix}{t}") for t in list(played)[:20]) == 20,
        30,
        what="track catalogue hashes in the cluster",
    )
    first = f"{s.catalog_prefix}{events[0].track_id}"
    wait_until(lambda: client.hget(first, "plays"), 30, what="play counts (HINCRBY) in the cluster")
    worker.stop()
    # a restart reads that checkpoint back through the cluster client
    again = worker_factory(s)
    assert "restored models from checkpoint" in again.log_text()
    leftovers = list(client.scan_iter(match=f"{{{key}}}:upload:*"))
    assert leftovers == []
    for k in client.scan_iter(match=f"{s.redis_prefix}*"):
        client.delete(k)
    client.delete(key)
    reader.close()


def _run_worker_cli(s: Settings) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream.tools.cli", "worker"],
        env=settings_env(s), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_wrong_redis_mode_fails_at_start_naming_the_setting(
    services: stack.StackConfig, redis_cluster: stack_cluster.ClusterConfig
) -> None:
    # a standalone client against a cluster node
    plain = unique_settings(services, redis_url=f"redis://127.0.0.1:{redis_cluster.redis_port}/0")
    proc = _run_worker_cli(plain)
    assert proc.returncode != 0
    assert "setting 'redis_cluster'" in proc.stdout + proc.stderr
    assert "is a Redis Cluster node" in proc.stdout + proc.stderr
    # a cluster client against the shared standalone Redis (redis_cluster=true this time)
    wrong = unique_settings(services, redis_cluster=True)
    proc = _run_worker_cli(wrong)
    assert proc.returncode != 0
    assert "setting 'redis_cluster'" in proc.stdout + proc.stderr
    assert "standalone" in proc.stdout + proc.stderr


def _key_in_slot(prefix: str, slot: int) -> str:
    """A listener key of ``prefix`` whose hash slot is ``slot``."""
    for i in range(1_000_000):
        key = f"{prefix}u{i}"
        if key_slot(key.encode()) == slot:
            return key
    raise AssertionError(f"no key for slot {slot}")


def test_writer_isolates_keys_keeps_the_seq_guard_and_follows_a_moved_slot(
    services: stack.StackConfig, redis_cluster: stack_cluster.ClusterConfig
) -> None:
    s = cluster_settings(services, redis_cluster)
    sync = redis.RedisCluster.from_url(f"redis://127.0.0.1:{redis_cluster.redis_port}/0")
    ports = sorted(primaries(redis_cluster))
    # the first slot the first primary owns: moved to the second primary below
    first = next(
        r
        for r in sync.cluster_slots().items()
        if r[1]["primary"][1] == ports[0]  # type: ignore[union-attr]
    )
    slot = first[0][0]
    moved_key = _key_in_slot(s.redis_prefix, slot)
    keys = [f"{s.redis_prefix}u-{i}" for i in range(60)]
    wrong = keys[7]
    sync.hset(wrong, "not", "a document")

    def write(key: str, seq: int) -> PendingWrite:
        doc = f'{{"user_id": "{key}", "seq": {seq}, "lineage": "L"}}'.encode()
        return PendingWrite(key, seq, doc, b"{}", 0, None, time.monotonic(), lineage="L")

    async def scenario() -> tuple[list[int], list[tuple[str, str, bool]]]:
        errors: list[tuple[str, str, bool]] = []
        results: list[int] = []
        client = connect_async(s.redis_url)
        writer = RecoWriter(
            client, ttl_s=60, channel="", key_attempts=2, key_retry_s=0.05,
            on_key_error=lambda *e: errors.append(e),
            on_flush=lambda done, res, _: results.extend(res),
        )  # fmt: skip
        writer.start()
        for key in [*keys, moved_key]:
            writer.submit(write(key, 5))
        await asyncio.wait_for(writer.drained(), 30)
        # a lower seq is refused per key (STALE), a higher one lands
        writer.submit(write(keys[0], 3))
        writer.submit(write(keys[1], 9))
        await asyncio.wait_for(writer.drained(), 30)
        # move moved_key's slot to another primary behind the writer's back, as
        # `redis-cli --cluster reshard` does: while it migrates, the old owner answers
        # ASK for the key (already moved); once done, every node answers MOVED
        src, dst = (redis.Redis(port=p) for p in ports[:2])
        ids = primaries(redis_cluster)
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[ports[0]])
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[ports[1]])
        for k in src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", ports[1], k, 0, 5000)
        writer.submit(write(moved_key, 6))  # ASK
        await asyncio.wait_for(writer.drained(), 30)
        for port in ports:
            redis.Redis(port=port).execute_command("CLUSTER SETSLOT", slot, "NODE", ids[ports[1]])
        writer.submit(write(moved_key, 7))  # MOVED
        await asyncio.wait_for(writer.drained(), 30)
        await writer.stop()
        await client.aclose()
        return results, errors

    results, errors = asyncio.run(scenario())
    try:
        # the key now lives on the second primary (read there directly: no redirection)
        moved = redis.Redis(port=ports[1]).get(moved_key)
        assert moved is not None and orjson.loads(moved)["seq"] == 7
        assert results.count(0) == 1  # the one stale write
        # the hash's key alone failed (twice, then dropped); the others were written
        assert errors == [("doc", "wrong_type", False), ("doc", "wrong_type", True)]
        assert sync.type(wrong) == b"hash"
        for key in keys:
            if key == wrong:
                continue
            seq = orjson.loads(sync.get(key))["seq"]
            assert seq == {keys[0]: 5, keys[1]: 9}.get(key, 5), key
    finally:
        sync.delete(*[k for k in [*keys, moved_key]])
        sync.close()


def test_redis_failover_drill_short(
    services: stack.StackConfig,
    redis_cluster: stack_cluster.ClusterConfig,
    worker_factory,
) -> None:
    """The CI variant of ``python -m load_tests.faults redis-failover`` (last in this
    module: it kills a primary of the module's cluster; the node rejoins as a replica)."""
    from load_tests.cluster_faults import redis_failover

    s = cluster_settings(services, redis_cluster)
    report = redis_failover(
        s, worker_factory, redis_cluster, rate=300, before_s=6, after_s=12, users=100
    )
    assert report["replica_promoted"], report
    assert report["worker_alive"], report
    assert report["listener_keys_on_killed_primary"] > 0, report
    assert report["listeners_with_play_after_promotion"] > 0, report
    assert report["lost"] == 0 and report["double_applied"] == 0, report
    assert report["users_missing"] == 0, report
    assert report["all_listeners"]["double_applied"] == 0, report
