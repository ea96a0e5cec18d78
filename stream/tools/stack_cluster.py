"""The clustered local stack: a 3-node Kafka KRaft cluster and a Redis Cluster on 127.0.0.1.

``stream stack up --brokers 3`` and ``stream stack up --redis-cluster`` start them (from the
same Maven jars and the same ``redis-server`` as the single-node stack, which stays the
default); ``status`` and ``down`` handle them like the other services. Each node is one
process with its own PID file (``kafka-<i>``, ``redis-cluster-<i>``), so a drill can kill
and restart one node.

- Kafka: every node is a combined broker+controller (configs/kafka/cluster.properties):
  three JVMs, a 3-voter quorum, replication factor 3 and ``min.insync.replicas=2``.
- Redis: 3 primaries + 3 replicas (``redis-server --cluster-enabled yes``), joined by
  ``redis-cli --cluster create ... --cluster-replicas 1``; ready when every node reports
  ``cluster_state:ok``.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import socket
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from stream.errors import StackError
from stream.tools import stack

#: the cluster stack's defaults; STREAM_STACK_KAFKA_CLUSTER_PORT / _CONTROLLER_PORT and
#: STREAM_STACK_REDIS_CLUSTER_PORT move them (node i listens on base + i)
KAFKA_CLUSTER_PORT: Final = 19092
KAFKA_CLUSTER_CONTROLLER_PORT: Final = 19192
REDIS_CLUSTER_PORT: Final = 7000
REDIS_CLUSTER_NODES: Final = 6  # 3 primaries, each with one replica
#: a Redis Cluster node is failed over after this long without answering its peers
REDIS_NODE_TIMEOUT_MS: Final = 3000


@dataclass(frozen=True)
class ClusterConfig:
    """Where the clustered services live: a state dir (shared with the single-node stack's
    layout) and the first port of each range."""

    base: stack.StackConfig
    brokers: int = 3
    kafka_port: int = KAFKA_CLUSTER_PORT
    controller_port: int = KAFKA_CLUSTER_CONTROLLER_PORT
    redis_port: int = REDIS_CLUSTER_PORT

    @classmethod
    def from_env(cls, base: stack.StackConfig, brokers: int = 3) -> ClusterConfig:
        if brokers < 1:
            raise StackError(f"--brokers must be >= 1, got {brokers}")
        return cls(base=base, brokers=brokers, **ports_from_env())

    @property
    def broker_ports(self) -> list[int]:
        return [self.kafka_port + i for i in range(self.brokers)]

    @property
    def bootstrap(self) -> str:
        """The ``kafka_bootstrap`` setting for this cluster."""
        return ",".join(f"127.0.0.1:{p}" for p in self.broker_ports)

    @property
    def redis_ports(self) -> list[int]:
        return [self.redis_port + i for i in range(REDIS_CLUSTER_NODES)]

    @property
    def redis_url(self) -> str:
        """The ``redis_url`` setting for this cluster (any node is a seed)."""
        return f"redis+cluster://127.0.0.1:{self.redis_port}/0"


# --------------------------------------------------------------------------- Kafka cluster

KAFKA_MARKER: Final = "kafka.Kafka"


def kafka_node(i: int) -> str:
    """The PID-file name of Kafka node ``i`` (node.id ``i + 1``)."""
    return f"kafka-{i}"


def _node_properties(cc: ClusterConfig, i: int) -> Path:
    root = cc.base.state_dir / "kafka-cluster" / f"node-{i}"
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    voters = ",".join(f"{j + 1}@127.0.0.1:{cc.controller_port + j}" for j in range(cc.brokers))
    text = (stack.CONFIGS / "kafka" / "cluster.properties").read_text()
    for name, value in {
        "node_id": str(i + 1),
        "voters": voters,
        "broker_port": str(cc.kafka_port + i),
        "controller_port": str(cc.controller_port + i),
        "log_dir": str(data),
    }.items():
        text = text.replace("${" + name + "}", value)
    if cc.brokers < 3:  # a smaller cluster cannot keep 3 copies
        n = str(cc.brokers)
        isr = str(min(2, cc.brokers))
        text = "\n".join(
            (
                f"{ln.split('=')[0]}={isr if 'min' in ln.split('=')[0] else n}"
                if "replication.factor=" in ln or "min.isr=" in ln or "min.insync" in ln
                else ln
            )
            for ln in text.splitlines()
        )
    out = root / "server.properties"
    out.write_text(text)
    return out


def _java(cc: ClusterConfig, libs: Path, i: int) -> list[str]:
    base = stack._java_base(cc.base, libs)
    # three JVMs on a small machine: half the single broker's heap each
    base = [a for a in base if not a.startswith(("-Xms", "-Xmx"))]
    logs = cc.base.state_dir / "kafka-cluster" / f"node-{i}" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base = [f"-Dkafka.logs.dir={logs}" if a.startswith("-Dkafka.logs.dir=") else a for a in base]
    return [base[0], "-Xms128m", "-Xmx512m", *base[1:]]


def _format_node(cc: ClusterConfig, libs: Path, i: int, props: Path, cluster_id: str) -> None:
    if (cc.base.state_dir / "kafka-cluster" / f"node-{i}" / "data" / "meta.properties").exists():
        return
    argv = [*_java(cc, libs, i), "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c"]
    proc = subprocess.run([*argv, str(props)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise StackError(f"kafka node {i}: storage format failed:\n{proc.stdout}\n{proc.stderr}")


def _cluster_id(cc: ClusterConfig) -> str:
    """One id for every node (kept in the state dir so a re-formatted node rejoins)."""
    path = cc.base.state_dir / "kafka-cluster" / "cluster.id"
    if path.exists():
        return path.read_text().strip()
    cid = "-"
    while cid.startswith("-"):  # as Kafka's Uuid.randomUuid: "-..." reads as an option
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cid)
    return cid


def kafka_cluster_brokers(bootstrap: str) -> int:
    """How many brokers the cluster at ``bootstrap`` reports (0 if it does not answer)."""
    from aiokafka.admin import AIOKafkaAdminClient

    async def probe() -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
        try:
            await asyncio.wait_for(admin.start(), 5)
            cluster = await asyncio.wait_for(admin.describe_cluster(), 5)
            return len(cluster.get("brokers") or [])
        finally:
            await admin.close()

    try:
        return asyncio.run(probe())
    except Exception:  # noqa: BLE001 - not answering is an answer here
        return 0


def start_kafka_node(cc: ClusterConfig, i: int) -> None:
    """Start node ``i`` if it is not running (formatting its storage the first time)."""
    name = kafka_node(i)
    if stack._running_pid(cc.base, name, KAFKA_MARKER):
        return
    for port in (cc.kafka_port + i, cc.controller_port + i):
        if stack._port_open(port):
            raise StackError(
                f"port {port} is already in use by a process this stack did not start; stop "
                "it or set STREAM_STACK_KAFKA_CLUSTER_PORT / _CONTROLLER_PORT"
            )
    libs = stack.ensure_kafka_jars(cc.base)
    props = _node_properties(cc, i)
    _format_node(cc, libs, i, props, _cluster_id(cc))
    stack._spawn(cc.base, name, [*_java(cc, libs, i), KAFKA_MARKER, str(props)])


def start_kafka_cluster(cc: ClusterConfig, timeout: float = 180) -> None:
    """Start every node and wait until the cluster reports all its brokers."""
    for i in range(cc.brokers):
        start_kafka_node(cc, i)

    def alive() -> bool:
        return all(stack._alive(cc.base, kafka_node(i)) for i in range(cc.brokers))

    stack._wait(
        f"kafka cluster ({cc.brokers} brokers)",
        lambda: kafka_cluster_brokers(cc.bootstrap) == cc.brokers,
        timeout,
        alive,
    )
    stack.log(f"kafka cluster of {cc.brokers} brokers ready: kafka_bootstrap={cc.bootstrap}")


def stop_kafka_node(cc: ClusterConfig, i: int) -> bool:
    return stack._stop(cc.base, kafka_node(i), KAFKA_MARKER, timeout=15.0)


def stop_kafka_cluster(cc: ClusterConfig) -> bool:
    """Stop every node at once: stopped one after the other, the last ones lose their
    quorum and hang in controlled shutdown until the SIGKILL."""
    with ThreadPoolExecutor(max_workers=cc.brokers) as pool:
        stopped = list(pool.map(lambda i: stop_kafka_node(cc, i), range(cc.brokers)))
    return any(stopped)


# --------------------------------------------------------------------------- Redis Cluster

REDIS_MARKER: Final = "redis-server"


def redis_node(i: int) -> str:
    return f"redis-cluster-{i}"


def _redis_command(port: int, password: str, *args: str, timeout: float = 2.0) -> bytes:
    """One command's raw reply (RESP), without the client library."""
    parts = [f"${len(a.encode())}\r\n{a}\r\n" for a in args]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if password:
            s.sendall(f"AUTH {password}\r\n".encode())
            s.recv(64)
        s.sendall(f"*{len(args)}\r\n{''.join(parts)}".encode())
        chunks = b""
        while True:
            chunk = s.recv(65536)
            chunks += chunk
            if not chunk or chunks.endswith(b"\r\n") and len(chunk) < 65536:
                return chunks


def cluster_info(port: int, password: str = "") -> dict[str, str]:
    """``CLUSTER INFO`` of the node on ``port`` as a dict (empty if it does not answer)."""
    try:
        raw = _redis_command(port, password, "CLUSTER", "INFO").decode(errors="replace")
    except OSError:
        return {}
    out = {}
    for line in raw.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def redis_cluster_ok(cc: ClusterConfig) -> bool:
    """Every node answers ``cluster_state:ok`` and knows all six nodes."""
    pw = cc.base.redis_password
    infos = [cluster_info(p, pw) for p in cc.redis_ports]
    return all(
        i.get("cluster_state") == "ok"
        and i.get("cluster_known_nodes") == str(REDIS_CLUSTER_NODES)
        and i.get("cluster_slots_assigned") == "16384"
        for i in infos
    )


def start_redis_node(cc: ClusterConfig, i: int) -> None:
    name = redis_node(i)
    if stack._running_pid(cc.base, name, REDIS_MARKER):
        return
    port = cc.redis_port + i
    for p in (port, port + 10000):
        if stack._port_open(p):
            raise StackError(
                f"port {p} is already in use by a process this stack did not start; stop it "
                "or set STREAM_STACK_REDIS_CLUSTER_PORT (node i uses base+i and base+i+10000)"
            )
    server = stack._require("redis-server", "install Redis (apt-get install redis-server)")
    workdir = cc.base.state_dir / "redis-cluster" / f"node-{i}"
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        *stack.redis_argv(server, port, workdir),
        "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", str(REDIS_NODE_TIMEOUT_MS),
    ]  # fmt: skip
    if cc.base.redis_password:
        argv += ["--requirepass", cc.base.redis_password, "--masterauth", cc.base.redis_password]
    stack._spawn(cc.base, name, argv)


def _create_cluster(cc: ClusterConfig) -> None:
    cli = stack._require("redis-cli", "install Redis (apt-get install redis-tools)")
    argv = [cli]
    if cc.base.redis_password:
        argv += ["--no-auth-warning", "-a", cc.base.redis_password]
    argv += ["--cluster", "create", *(f"127.0.0.1:{p}" for p in cc.redis_ports)]
    argv += ["--cluster-replicas", "1", "--cluster-yes"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise StackError(f"redis-cli --cluster create failed:\n{proc.stdout}\n{proc.stderr}")
    stack.log("redis cluster created (3 primaries, 3 replicas)")


def start_redis_cluster(cc: ClusterConfig, timeout: float = 60) -> None:
    """Start the six nodes, join them into a cluster the first time, wait for ``ok``."""
    for i in range(REDIS_CLUSTER_NODES):
        start_redis_node(cc, i)
    pw = cc.base.redis_password

    def alive() -> bool:
        return all(stack._alive(cc.base, redis_node(i)) for i in range(REDIS_CLUSTER_NODES))

    stack._wait(
        "redis cluster nodes",
        lambda: all(stack.redis_ready(p, pw) for p in cc.redis_ports),
        30,
        alive,
    )
    # nodes that already form a cluster (their nodes.conf) only need to find each other
    if cluster_info(cc.redis_port, pw).get("cluster_slots_assigned") == "0":
        _create_cluster(cc)
    stack._wait("redis cluster", lambda: redis_cluster_ok(cc), timeout, alive)
    stack.log(f"redis cluster ready: redis_url={cc.redis_url}")


def stop_redis_node(cc: ClusterConfig, i: int) -> bool:
    return stack._stop(cc.base, redis_node(i), REDIS_MARKER)


def stop_redis_cluster(cc: ClusterConfig) -> bool:
    return any([stop_redis_node(cc, i) for i in reversed(range(REDIS_CLUSTER_NODES))])


def reset_redis_cluster(cc: ClusterConfig) -> None:
    """Forget the cluster's layout (its nodes.conf files); only when every node is stopped."""
    if any(stack._running_pid(cc.base, redis_node(i), REDIS_MARKER) for i in range(6)):
        raise StackError("stop the redis cluster before resetting it")
    shutil.rmtree(cc.base.state_dir / "redis-cluster", ignore_errors=True)


# --------------------------------------------------------------------------- status


def status(cc: ClusterConfig) -> dict[str, dict[str, object]]:
    """Per-node status of whatever part of the clustered stack has PID files."""
    out: dict[str, dict[str, object]] = {}
    pids = cc.base.state_dir / "pids"
    started = {p.stem for p in pids.glob("*.pid")} if pids.exists() else set()
    kafka_nodes = [i for i in range(cc.brokers) if kafka_node(i) in started]
    if kafka_nodes:
        brokers = kafka_cluster_brokers(cc.bootstrap)
        for i in kafka_nodes:
            pid = stack._running_pid(cc.base, kafka_node(i), KAFKA_MARKER)
            out[kafka_node(i)] = {
                "pid": pid,
                "port": cc.kafka_port + i,
                "ready": bool(pid) and brokers == cc.brokers,
            }
    redis_nodes = [i for i in range(REDIS_CLUSTER_NODES) if redis_node(i) in started]
    for i in redis_nodes:
        pid = stack._running_pid(cc.base, redis_node(i), REDIS_MARKER)
        info = cluster_info(cc.redis_port + i, cc.base.redis_password) if pid else {}
        out[redis_node(i)] = {
            "pid": pid,
            "port": cc.redis_port + i,
            "ready": info.get("cluster_state") == "ok",
        }
    return out


def private_cluster_config(
    state_dir: Path,
    *,
    kafka_port: int = 0,
    controller_port: int = 0,
    redis_port: int = 0,
    brokers: int = 3,
) -> ClusterConfig:
    """A ClusterConfig with its own state dir and ports (tests, drills)."""
    base = stack.private_config(state_dir)
    return ClusterConfig(
        base=base,
        brokers=brokers,
        kafka_port=kafka_port or KAFKA_CLUSTER_PORT,
        controller_port=controller_port or KAFKA_CLUSTER_CONTROLLER_PORT,
        redis_port=redis_port or REDIS_CLUSTER_PORT,
    )


def ports_from_env(
    kafka_port: int = KAFKA_CLUSTER_PORT,
    controller_port: int = KAFKA_CLUSTER_CONTROLLER_PORT,
    redis_port: int = REDIS_CLUSTER_PORT,
) -> dict[str, int]:
    """The first port of each range: STREAM_STACK_KAFKA_CLUSTER_PORT,
    STREAM_STACK_KAFKA_CLUSTER_CONTROLLER_PORT and STREAM_STACK_REDIS_CLUSTER_PORT where set,
    else the given defaults (the tests and drills pass their own ranges)."""
    return {
        "kafka_port": stack._env_int("STREAM_STACK_KAFKA_CLUSTER_PORT", kafka_port),
        "controller_port": stack._env_int(
            "STREAM_STACK_KAFKA_CLUSTER_CONTROLLER_PORT", controller_port
        ),
        "redis_port": stack._env_int("STREAM_STACK_REDIS_CLUSTER_PORT", redis_port),
    }


def env_for(cc: ClusterConfig) -> dict[str, str]:
    """The environment that points a worker at this cluster (STREAM_* settings)."""
    return {
        "STREAM_KAFKA_BOOTSTRAP": cc.bootstrap,
        "STREAM_REPLICATION_FACTOR": str(min(3, cc.brokers)),
        "STREAM_MIN_INSYNC_REPLICAS": str(min(2, cc.brokers)),
        "STREAM_REDIS_URL": cc.redis_url,
    }
