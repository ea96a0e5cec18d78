"""docker-compose.yml and the worker Dockerfile: consistent with the local stack's configs.

Docker cannot run here, so this validates what can be validated without an engine: the
compose file is checked by Compose itself (``docker compose config -q`` when the plugin is
installed, else Debian's ``docker-compose config -q``; neither contacts a daemon), and its
content is cross-checked against configs/ (Kafka settings, mounted config paths, the worker's
environment). A missing Compose is a failure, not a skip: install ``docker-compose``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream.tools import stack

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def compose_cli() -> list[str]:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed "
                "(apt-get install docker-compose) -- cannot validate docker-compose.yml")


def test_compose_validates_with_compose_itself() -> None:
    proc = subprocess.run(
        [*compose_cli(), "--project-directory", str(ROOT), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_services(compose: dict[str, Any]) -> None:
    expected = {"kafka", "redis", "prometheus", "grafana", "worker", "producer"}
    assert set(compose["services"]) >= expected
    kafka = compose["services"]["kafka"]
    assert kafka["image"] == f"apache/kafka:{stack.KAFKA_VERSION}"  # same broker as the stack


def test_kafka_mirrors_server_properties(compose: dict[str, Any]) -> None:
    env = {k: str(v) for k, v in compose["services"]["kafka"]["environment"].items()}
    props = {}
    for line in (ROOT / "configs/kafka/server.properties").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    networked = {"controller.quorum.voters", "listeners", "advertised.listeners",
                 "listener.security.protocol.map", "log.dirs"}
    for key, value in props.items():
        if key in networked:  # container host names and paths differ by design
            continue
        name = "KAFKA_" + key.upper().replace(".", "_")
        assert env.get(name) == value, f"{name} should be {value!r} like server.properties"
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, single node


def test_worker_and_producer(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    assert worker["environment"]["STREAM_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert worker["environment"]["STREAM_REDIS_URL"] == "redis://redis:6379/0"
    assert worker["environment"]["STREAM_METRICS_HOST"] == "0.0.0.0"
    assert worker["build"] == "." and (ROOT / "Dockerfile").is_file()
    producer = compose["services"]["producer"]
    assert producer["command"][:3] == ["produce", "--source", "lastfm"]
    assert "../shared/datasets:/datasets:ro" in producer["volumes"]
    assert producer["environment"]["STREAM_DATASETS_DIR"] == "/datasets"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["stream"]' in dockerfile


def test_prometheus_scrapes_the_worker_service(compose: dict[str, Any]) -> None:
    prom = yaml.safe_load((ROOT / "configs/prometheus/prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]]
    port = str(compose["services"]["worker"]["environment"]["STREAM_METRICS_PORT"])
    assert f"worker:{port}" in targets
    assert "/etc/prometheus/rules/*.yml" in prom["rule_files"]
    assert not any("lifecycle" in str(a) for a in compose["services"]["prometheus"]["command"])


def test_bind_mounts_exist(compose: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana"):
        for volume in compose["services"][name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    grafana = " ".join(compose["services"]["grafana"]["volumes"])
    assert "./configs/grafana/provisioning:/etc/grafana/provisioning" in grafana
    provider = yaml.safe_load(
        (ROOT / "configs/grafana/provisioning/dashboards/stream.yml").read_text()
    )
    path = provider["providers"][0]["options"]["path"]
    assert f"./configs/grafana/dashboards:{path}" in grafana
