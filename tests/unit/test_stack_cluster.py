"""The clustered stack's rendered configs and the docker-compose ``cluster`` profile.

The clusters themselves are started for real in tests/integration/test_kafka_cluster.py and
test_redis_cluster.py; this checks what can be checked without starting them.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream.tools import stack, stack_cluster
from tests.unit.test_docker_compose import COMPOSE, ROOT, compose_cli


def _props(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_node_properties_form_one_replicated_quorum(tmp_path: Path) -> None:
    cc = stack_cluster.private_cluster_config(
        tmp_path, kafka_port=39092, controller_port=39192, redis_port=37000
    )
    nodes = [_props(stack_cluster._node_properties(cc, i)) for i in range(3)]
    assert [n["node.id"] for n in nodes] == ["1", "2", "3"]
    voters = "1@127.0.0.1:39192,2@127.0.0.1:39193,3@127.0.0.1:39194"
    assert {n["controller.quorum.voters"] for n in nodes} == {voters}
    assert [n["advertised.listeners"] for n in nodes] == [
        f"PLAINTEXT://127.0.0.1:{p}" for p in (39092, 39093, 39094)
    ]
    assert len({n["log.dirs"] for n in nodes}) == 3  # each node its own storage
    for n in nodes:
        assert n["process.roles"] == "broker,controller"
        assert n["default.replication.factor"] == "3"
        assert n["offsets.topic.replication.factor"] == "3"
        assert n["min.insync.replicas"] == "2"
        assert n["unclean.leader.election.enable"] == "false"
        assert "${" not in "".join(n.values())
    assert cc.bootstrap == "127.0.0.1:39092,127.0.0.1:39093,127.0.0.1:39094"
    assert cc.redis_ports == list(range(37000, 37006))
    assert cc.redis_url == "redis+cluster://127.0.0.1:37000/0"


def test_a_one_broker_cluster_cannot_ask_for_three_copies(tmp_path: Path) -> None:
    cc = stack_cluster.private_cluster_config(tmp_path, brokers=1)
    props = _props(stack_cluster._node_properties(cc, 0))
    assert props["default.replication.factor"] == "1"
    assert props["min.insync.replicas"] == "1"
    assert props["transaction.state.log.min.isr"] == "1"


def test_env_for_points_a_worker_at_the_cluster(tmp_path: Path) -> None:
    cc = stack_cluster.private_cluster_config(tmp_path, kafka_port=39092, redis_port=37000)
    env = stack_cluster.env_for(cc)
    assert env["STREAM_REPLICATION_FACTOR"] == "3"
    assert env["STREAM_MIN_INSYNC_REPLICAS"] == "2"
    assert env["STREAM_REDIS_URL"].startswith("redis+cluster://")


def test_brokers_must_be_positive() -> None:
    with pytest.raises(stack.StackError, match="--brokers"):
        stack_cluster.ClusterConfig.from_env(stack.StackConfig.from_env(), brokers=0)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_cluster_profile_validates_with_compose_itself() -> None:
    proc = subprocess.run(
        [*compose_cli(), "--project-directory", str(ROOT), "-f", str(COMPOSE),
         "--profile", "cluster", "config", "--services"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    services = set(proc.stdout.split())
    assert {"kafka-1", "kafka-2", "kafka-3", "redis-cluster-init", "worker-cluster"} <= services
    assert {f"redis-node-{i}" for i in range(6)} <= services


def test_cluster_profile_mirrors_cluster_properties(compose: dict[str, Any]) -> None:
    props = _props(ROOT / "configs/kafka/cluster.properties")
    networked = {"node.id", "controller.quorum.voters", "listeners", "advertised.listeners",
                 "listener.security.protocol.map", "log.dirs", "log.retention.hours",
                 "log.segment.bytes", "num.network.threads", "num.io.threads"}
    for i in (1, 2, 3):
        node = compose["services"][f"kafka-{i}"]
        assert node["profiles"] == ["cluster"]
        env = {k: str(v) for k, v in node["environment"].items()}
        assert env["KAFKA_NODE_ID"] == str(i)
        for key, value in props.items():
            if key in networked:
                continue
            name = "KAFKA_" + key.upper().replace(".", "_")
            assert env.get(name) == value, f"kafka-{i}: {name} should be {value!r}"
    worker = compose["services"]["worker-cluster"]["environment"]
    assert worker["STREAM_REDIS_URL"].startswith("redis+cluster://")
    assert worker["STREAM_REPLICATION_FACTOR"] == "3"
    assert worker["STREAM_KAFKA_ACKS"] == "all"
    for i in range(6):
        command = compose["services"][f"redis-node-{i}"]["command"]
        assert command[command.index("--cluster-enabled") + 1] == "yes"
    # the single-node services stay outside the profile: `docker compose up` is unchanged
    assert "profiles" not in compose["services"]["kafka"]


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"STREAM_KAFKA_ACKS": "0"}, "'kafka_acks'"),
        ({"STREAM_MIN_INSYNC_REPLICAS": "2"}, "'min_insync_replicas'"),  # RF 1
        ({"STREAM_REDIS_URL": "redis+sentinel://h:1/0"}, "'redis_url'"),
        (
            {"STREAM_REDIS_URL": "unix:///tmp/r.sock", "STREAM_REDIS_CLUSTER": "true"},
            "'redis_cluster'",
        ),
    ],
)
def test_cluster_settings_are_validated(env: dict[str, str], needle: str) -> None:
    from stream.config import load_settings
    from stream.errors import ConfigError

    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_settings(env=env, file=None)


def test_cluster_settings_reach_the_clients() -> None:
    from stream.adapters.kafka import make_producer
    from stream.adapters.redis_store import cluster_url
    from stream.config import load_settings, redis_auth

    s = load_settings(
        env={
            "STREAM_REPLICATION_FACTOR": "3",
            "STREAM_MIN_INSYNC_REPLICAS": "2",
            "STREAM_REDIS_URL": "redis+cluster://127.0.0.1:7000/0",
        },
        file=None,
    )
    assert s.kafka_acks == "all"  # the default, said by the setting
    assert cluster_url(s.redis_url, redis_auth(s)["cluster"]) == ("redis://127.0.0.1:7000/0", True)
    assert cluster_url("redis://h:1/0", load_settings(env={"STREAM_REDIS_CLUSTER": "1"},
                                                      file=None).redis_cluster)[1]

    async def acks(settings: Any) -> tuple[int, bool]:
        producer = make_producer(settings)  # not started: nothing is sent
        try:
            return producer._sender._acks, producer._txn_manager is not None
        finally:
            await producer.stop()

    assert asyncio.run(acks(s)) == (-1, True)  # all, idempotent
    assert asyncio.run(acks(load_settings(env={"STREAM_KAFKA_ACKS": "1"}, file=None))) == (
        1,
        False,  # acks=1 cannot be idempotent
    )
