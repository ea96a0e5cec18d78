"""Fault drills on the clustered stack (issue 18): a Redis Cluster primary failover and a
Kafka partition leader kill.

Run from load_tests.faults (``python -m load_tests.faults redis-failover`` /
``kafka-leader-kill``); the CI variants are test_redis_failover_drill_short
(tests/integration/test_redis_cluster.py) and test_kafka_leader_kill_drill_short
(tests/integration/test_kafka_cluster.py). The cluster is
started through stream.tools.stack_cluster (own ports and state dir); Kafka is the shared broker.
Every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from load_tests.drill_timeline import (
    DrillTimeline,
    NotificationListener,
    TimedProducer,
    freshness,
    plot_timeline,
)
from load_tests.faults import (
    DrillFailed,
    StartWorker,
    _clean,
    cleanup_keys,
    compare,
    expected_counts,
    free_port,
    reader_for,
    stall_diagnostics,
    valid_events,
    wait_for_match,
)
from stream.config import Settings
from stream.tools import stack, stack_cluster


def _primaries(cc: stack_cluster.ClusterConfig) -> dict[int, int]:
    """Port of each primary -> index of the node (its PID file)."""
    import redis

    out: dict[int, int] = {}
    for i, port in enumerate(cc.redis_ports):
        try:
            if redis.Redis(port=port, socket_timeout=2).info("replication")["role"] == "master":
                out[port] = i
        except (redis.RedisError, OSError):
            continue
    return out


def _promoted(cc: stack_cluster.ClusterConfig, dead_port: int) -> bool:
    """A surviving node reports cluster_state:ok again and the dead node as failed."""
    import redis

    for port in cc.redis_ports:
        if port == dead_port:
            continue
        try:
            client = redis.Redis(port=port, socket_timeout=2)
            if client.cluster("info").get("cluster_state") != "ok":
                return False
            nodes = client.cluster("nodes")
        except (redis.RedisError, OSError):
            continue
        dead = [v for k, v in nodes.items() if k.split("@")[0].endswith(f":{dead_port}")]
        return bool(dead) and "fail" in dead[0]["flags"]
    return False


def redis_failover(
    settings: Settings,
    start_worker: StartWorker,
    cc: stack_cluster.ClusterConfig,
    *,
    rate: float = 300.0,
    before_s: float = 15.0,
    after_s: float = 30.0,
    users: int = 300,
    seed: int = 21,
    promotion_timeout_s: float = 60.0,
    catch_up_timeout_s: float = 120.0,
    plot: Path | None = None,
) -> dict[str, Any]:
    """Plays at ``rate`` for ``before_s + after_s``; after ``before_s`` SIGKILL the Redis
    primary owning the most listener keys. Its replica is promoted; the worker must stay
    alive, every listener with a play after the promotion must end with a list that counts
    all their plays (nothing lost from the Faust table), and the other listeners' lists are
    reported (a write acknowledged by the dead primary and not yet replicated is lost from
    Redis until that listener's next play). The report's ``timeline`` (and the PNG at
    ``plot``) shows the list updates and their freshness per second, marking the kill and
    the promotion."""
    if not stack_cluster.redis_cluster_ok(cc):
        stack_cluster.start_redis_cluster(cc)
    settings = settings.replace(
        redis_url=cc.redis_url, redis_password="", redis_cluster=True, redis_retry_max_s=1.0
    )
    events = valid_events(int(rate * (before_s + after_s)), users=users, seed=seed, tag=f"rf{seed}")
    reader = reader_for(settings)
    # on a replica: the drill kills a primary only; PUBLISH reaches every node of the cluster
    replica = min(set(cc.redis_ports) - set(_primaries(cc)))
    on_replica = settings.replace(redis_url=f"redis://127.0.0.1:{replica}/0", redis_cluster=False)
    listener = NotificationListener(lambda: reader_for(on_replica))
    listener.start()
    started = time.monotonic()
    try:
        worker = start_worker(settings)
        producer = TimedProducer(settings, events, rate, max_seconds=before_s + after_s + 30)
        clock = DrillTimeline(listener, producer)
        clock.begin()
        time.sleep(before_s)
        primaries = _primaries(cc)
        owners = Counter(
            reader.client.get_node_from_key(f"{settings.redis_prefix}{u}").port  # type: ignore[attr-defined]
            for u in {e.user_id for e in events[: producer.yielded]}
        )
        victim_port = max(primaries, key=lambda p: owners.get(p, 0))
        errors_before = worker.metric_value("stream_redis_errors_total")
        pid = stack.kill_now(cc.base, stack_cluster.redis_node(primaries[victim_port]), "redis")
        if pid is None:
            raise DrillFailed(f"no PID for the primary on {victim_port}")
        killed_at = time.monotonic()
        clock.mark("kill", killed_at)
        produced_at_kill = producer.yielded
        deadline = killed_at + promotion_timeout_s
        while time.monotonic() < deadline and not _promoted(cc, victim_port):
            time.sleep(0.2)
        promoted = _promoted(cc, victim_port)
        promotion_s = time.monotonic() - killed_at
        clock.mark("promotion" if promoted else "no promotion")
        produced_at_promotion = producer.yielded
        producer.join(before_s + after_s + 60)
        if producer.error is not None:
            raise DrillFailed(f"producer failed: {producer.error!r}")
        sent = producer.sent
        expected = expected_counts(sent)
        # listeners with a play sent after the promotion (+1 s for it to be read)
        margin = int(rate)
        after = {e.user_id for e in sent[produced_at_promotion + margin :]}
        result, waited = wait_for_match(
            reader, {u: n for u, n in expected.items() if u in after}, catch_up_timeout_s
        )
        seen = clock.finish()
        if not _clean(result):
            result["stall_diagnostics"] = stall_diagnostics(worker)
        everyone = compare(reader, expected)
        alive = worker.proc is not None and worker.proc.poll() is None
        report = {
            "drill": "redis_failover",
            "rate_ev_s": rate,
            "produced": len(sent),
            "produced_before_kill": produced_at_kill,
            "killed_primary_port": victim_port,
            "listener_keys_on_killed_primary": owners.get(victim_port, 0),
            "replica_promoted": promoted,
            "kill_to_promotion_s": round(promotion_s, 2),
            "redis_flush_errors": int(
                worker.metric_value("stream_redis_errors_total") - errors_before
            ),
            "redis_key_write_errors": int(worker.metric_value("stream_redis_write_errors_total")),
            "worker_alive": alive,
            "logged_redis_back": "redis is back" in worker.log_text(),
            "catch_up_s": round(waited, 2),
            "listeners_with_play_after_promotion": len(after),
            **result,
            "all_listeners": {
                k: everyone[k] for k in ("users", "lost", "double_applied", "users_missing")
            },
            "duration_s": round(time.monotonic() - started, 1),
            "notifications_subscribed_on_port": replica,
            **seen,
        }
        cleanup_keys(reader, settings)
        if alive:
            worker.stop()
        # the killed node comes back as a replica of the promoted one
        stack_cluster.start_redis_node(cc, primaries[victim_port])
        if plot is not None:
            plot_failover(report, plot)
        return report
    finally:
        listener.halt()
        reader.close()


def plot_failover(report: dict[str, Any], path: Path) -> None:
    """redis_failover's timeline: list updates and freshness per second, kill and promotion."""
    plot_timeline(
        report, path, xlabel="seconds since the first play",
        title=f"redis failover: {report['produced']:,} plays at {report['rate_ev_s']:g}/s on "
        f"Redis Cluster 3+3; primary :{report['killed_primary_port']} "
        f"({report['listener_keys_on_killed_primary']} listener keys)\nSIGKILLed (red), "
        f"replica promoted (green); lost {report['lost']}, double {report['double_applied']}",
    )


def run(settings: Settings, start_worker: StartWorker, workdir: Path, **kw: Any) -> dict[str, Any]:
    """The command-line variant: its own cluster (ports 17000-17005, or from
    STREAM_STACK_REDIS_CLUSTER_PORT), stopped at the end."""
    cc = stack_cluster.private_cluster_config(
        workdir / "redis-cluster", **stack_cluster.ports_from_env(redis_port=17000)
    )
    stack_cluster.start_redis_cluster(cc)
    try:
        return redis_failover(settings, start_worker, cc, **kw)
    finally:
        stack_cluster.stop_redis_cluster(cc)


async def _plays_leaders(bootstrap: str, topic: str) -> Counter[int]:
    """Node id -> how many partitions of ``topic`` it leads."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
        return Counter(p["leader"] for p in described["partitions"])
    finally:
        await admin.close()


def kafka_leader_kill(
    settings: Settings,
    start_worker: StartWorker,
    cc: stack_cluster.ClusterConfig,
    *,
    rate: float = 300.0,
    before_s: float = 15.0,
    down_s: float = 20.0,
    after_s: float = 15.0,
    users: int = 300,
    seed: int = 22,
    catch_up_timeout_s: float = 180.0,
    plot: Path | None = None,
) -> dict[str, Any]:
    """Plays at ``rate`` on a 3-broker cluster (RF 3, min ISR 2, acks=all); after
    ``before_s`` SIGKILL the broker leading the most plays partitions, restart it
    ``down_s`` later. Every play must be applied exactly once (lost 0, double-applied 0)
    and the worker must stay alive. The report's ``timeline`` (and the PNG at ``plot``)
    shows the list updates and their freshness per second, marking the kill and the
    broker's return."""
    settings = settings.replace(
        kafka_bootstrap=cc.bootstrap,
        replication_factor=3,
        min_insync_replicas=2,
        kafka_acks="all",
    )
    events = valid_events(
        int(rate * (before_s + down_s + after_s)), users=users, seed=seed, tag=f"lk{seed}"
    )
    reader = reader_for(settings)
    listener = NotificationListener(lambda: reader_for(settings))
    listener.start()
    started = time.monotonic()
    try:
        worker = start_worker(settings)
        producer = TimedProducer(
            settings, events, rate, max_seconds=before_s + down_s + after_s + 60
        )
        clock = DrillTimeline(listener, producer)
        clock.begin()
        time.sleep(before_s)
        leaders = asyncio.run(_plays_leaders(cc.bootstrap, settings.plays_topic))
        victim_id = max(leaders, key=lambda n: leaders[n])
        index = victim_id - 1  # node.id = index + 1 (configs/kafka/cluster.properties)
        processed_before = worker.metric_value("stream_events_total", outcome="processed")
        pid = stack.kill_now(cc.base, stack_cluster.kafka_node(index), "kafka.Kafka")
        if pid is None:
            raise DrillFailed(f"no PID for Kafka node {index}")
        killed_at = time.monotonic()
        clock.mark("kill", killed_at)
        produced_at_kill = producer.yielded
        time.sleep(down_s)
        processed_while_down = (
            worker.metric_value("stream_events_total", outcome="processed") - processed_before
        )
        alive_while_down = worker.proc is not None and worker.proc.poll() is None
        stack_cluster.start_kafka_node(cc, index)
        clock.mark("broker restarted")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if stack_cluster.kafka_cluster_brokers(cc.bootstrap) == cc.brokers:
                break
            time.sleep(1)
        back_s = time.monotonic() - killed_at
        clock.mark("broker back")
        producer.join(before_s + down_s + after_s + 90)
        if producer.error is not None:
            raise DrillFailed(f"producer failed: {producer.error!r}")
        expected = expected_counts(producer.sent)
        result, waited = wait_for_match(reader, expected, catch_up_timeout_s)
        seen = clock.finish()
        if not _clean(result):
            result["stall_diagnostics"] = stall_diagnostics(worker)
        alive = worker.proc is not None and worker.proc.poll() is None
        report = {
            "drill": "kafka_leader_kill",
            "rate_ev_s": rate,
            "produced": len(producer.sent),
            "produced_before_kill": produced_at_kill,
            "killed_node_id": victim_id,
            "plays_partitions_led_by_killed_node": leaders[victim_id],
            "plays_partitions": sum(leaders.values()),
            "broker_down_s": down_s,
            "kill_to_broker_back_s": round(back_s, 1),
            "processed_while_broker_down": int(processed_while_down),
            "worker_alive_while_broker_down": alive_while_down,
            "worker_alive": alive,
            "catch_up_s": round(waited, 2),
            **result,
            "duration_s": round(time.monotonic() - started, 1),
            **seen,
        }
        cleanup_keys(reader, settings)
        if alive:
            worker.stop()
        if plot is not None:
            plot_leader_kill(report, plot)
        return report
    finally:
        listener.halt()
        reader.close()


def plot_leader_kill(report: dict[str, Any], path: Path) -> None:
    """kafka_leader_kill's timeline: list updates and freshness per second, the kill and the
    broker's return."""
    plot_timeline(
        report, path, xlabel="seconds since the first play",
        title=f"kafka leader kill: {report['produced']:,} plays at {report['rate_ev_s']:g}/s "
        f"on 3 brokers; node {report['killed_node_id']} (leading "
        f"{report['plays_partitions_led_by_killed_node']} of {report['plays_partitions']} plays "
        f"partitions)\nSIGKILLed (red), restarted (dotted), back in the cluster (green); lost "
        f"{report['lost']}, double {report['double_applied']}",
    )


def run_leader_kill(
    settings: Settings, start_worker: StartWorker, workdir: Path, **kw: Any
) -> dict[str, Any]:
    """The command-line variant: its own 3-broker cluster (29092-29094, controllers
    29192-29194, or from STREAM_STACK_KAFKA_CLUSTER_PORT / _CONTROLLER_PORT), stopped at the
    end."""
    cc = stack_cluster.private_cluster_config(
        workdir / "kafka-cluster",
        **stack_cluster.ports_from_env(kafka_port=29092, controller_port=29192),
    )
    stack_cluster.start_kafka_cluster(cc)
    try:
        return kafka_leader_kill(settings, start_worker, cc, **kw)
    finally:
        stack_cluster.stop_kafka_cluster(cc)


def rebalance_storm(
    settings: Settings,
    start_worker: StartWorker,
    *,
    workers: int = 3,
    rate: float = 300.0,
    storm_s: float = 120.0,
    every_s: float = 15.0,
    users: int = 300,
    seed: int = 23,
    catch_up_timeout_s: float = 180.0,
    plot: Path | None = None,
) -> dict[str, Any]:
    """``workers`` workers in one group take plays at ``rate`` for ``storm_s``; every
    ``every_s`` (on the clock: a join does not wait for its worker to be ready) one of the
    ready workers is SIGKILLed or a new one joins (alternating, kills first; a kill is
    skipped for a join when only one worker is ready).
    Reports lost / double-applied, the p99 freshness of the notifications during the storm
    (notification's generated_at - the time the play went to the producer) and the longest
    gap without any notification."""
    rng = random.Random(seed)
    events = valid_events(int(rate * storm_s), users=users, seed=seed, tag=f"rs{seed}")
    reader = reader_for(settings)
    listener = NotificationListener(lambda: reader_for(settings))
    listener.start()
    time.sleep(1.0)
    running = [start_worker(settings.replace(metrics_port=free_port())) for _ in range(workers)]
    producer = TimedProducer(settings, events, rate, max_seconds=storm_s + 60)
    storm_start = time.monotonic()
    producer.start()
    changes: list[dict[str, Any]] = []
    lock = threading.Lock()
    joins: list[threading.Thread] = []
    join_errors: list[BaseException] = []

    def join_one(change: dict[str, Any]) -> None:
        # a new worker joins the group while the storm goes on: the next change does not
        # wait for it to be ready (it is killable only once it is)
        try:
            worker = start_worker(settings.replace(metrics_port=free_port()))
        except BaseException as exc:  # noqa: BLE001 - reported as a drill failure below
            join_errors.append(exc)
            return
        with lock:
            running.append(worker)
            change["ready_s"] = round(time.monotonic() - storm_start, 1)
            change["workers_ready"] = len(running)

    try:
        kill, n = True, 0
        while (n + 1) * every_s < storm_s:  # changes at every_s, 2 * every_s, ... on the clock
            n += 1
            time.sleep(max(0.0, storm_start + n * every_s - time.monotonic()))
            t = round(time.monotonic() - storm_start, 1)
            with lock:
                if kill and len(running) > 1:
                    victim = running.pop(rng.randrange(len(running)))
                    victim.kill()
                    changes.append({"at_s": t, "change": "kill", "workers_ready": len(running)})
                    kill = False
                    continue
            change = {"at_s": t, "change": "join"}
            changes.append(change)
            thread = threading.Thread(target=join_one, args=(change,), daemon=True)
            thread.start()
            joins.append(thread)
            kill = True
        for thread in joins:
            thread.join(120)
        if join_errors:
            raise DrillFailed(f"a joining worker failed to start: {join_errors[0]!r}")
        producer.join(storm_s + 90)
        storm_end = time.monotonic()
        if producer.error is not None:
            raise DrillFailed(f"producer failed: {producer.error!r}")
        expected = expected_counts(producer.sent)
        result, waited = wait_for_match(reader, expected, catch_up_timeout_s)
        if not _clean(result):
            result["stall_diagnostics"] = stall_diagnostics(running[0])
    finally:
        listener.halt()
        producer.halt()
    seen = freshness(listener, producer.sent_at_ms, storm_start, storm_end)
    alive = [w for w in running if w.proc is not None and w.proc.poll() is None]
    report = {
        "drill": "rebalance_storm",
        "rate_ev_s": rate,
        "storm_s": storm_s,
        "every_s": every_s,
        "produced": len(producer.sent),
        "changes": changes,
        "workers_alive_at_end": len(alive),
        "worker_alive": len(alive) == len(running),
        "notifications_during_storm": seen.pop("notifications"),
        **seen,
        "catch_up_s": round(waited, 2),
        "marks": storm_marks(changes),
        **result,
    }
    if plot is not None:
        plot_storm(report, plot)
    cleanup_keys(reader, settings)
    reader.close()
    for w in running:
        w.stop()
    return report


def storm_marks(changes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The storm's changes as plot marks: each kill and join, and when a joined worker was
    ready."""
    marks = [{"at_s": c["at_s"], "event": c["change"]} for c in changes]
    marks += [{"at_s": c["ready_s"], "event": "joined worker ready"} for c in changes
              if "ready_s" in c]
    return marks


def plot_storm(report: dict[str, Any], path: Path) -> None:
    """Updates per second and freshness per second, with the storm's kills and joins (from
    ``changes``: a report written before ``marks`` existed plots too)."""
    plot_timeline(
        {**report, "marks": storm_marks(report["changes"])}, path,
        xlabel="seconds since the storm began",
        title=f"rebalance storm: {report['produced']:,} plays at {report['rate_ev_s']:g}/s, "
        f"{len(report['changes'])} changes (red: SIGKILL, green: join, dotted: joined worker "
        f"ready); lost {report.get('lost')}, double {report.get('double_applied')}",
    )
