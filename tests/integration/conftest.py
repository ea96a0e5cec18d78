"""Fixtures for integration tests against the REAL local stack (Kafka, Redis, Prometheus)
started by `stream stack up` (see Makefile / .ci/run). If a service is unreachable the tests
FAIL -- they never skip.

Each test gets unique topic, consumer-group and Redis key names, so tests cannot see each
other's data. Workers run as real `stream worker` subprocesses.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from stream.adapters.redis_store import RecoReader
from stream.config import Settings, load_settings
from stream.core.events import PlayEvent
from stream.tools import stack
from stream.tools.producer import produce_events

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def stack_config() -> stack.StackConfig:
    return stack.StackConfig.from_env()


@pytest.fixture(scope="session")
def services(stack_config: stack.StackConfig) -> stack.StackConfig:
    """Fail (never skip) unless Kafka and Redis really answer."""
    problems = []
    try:
        if not stack.kafka_ready(stack_config.kafka_port):
            problems.append("Kafka answered without brokers")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"Kafka on 127.0.0.1:{stack_config.kafka_port}: {exc!r}")
    try:
        if not stack.redis_ready(stack_config.redis_port, stack_config.redis_password):
            problems.append("Redis did not answer PING")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"Redis on 127.0.0.1:{stack_config.redis_port}: {exc!r}")
    if problems:
        pytest.fail("local stack not reachable (run `stream stack up`): " + "; ".join(problems))
    return stack_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: one random key per test session (the workers refuse unsigned control commands)
TEST_WORKER_KEYS = f"test{uuid.uuid4().hex[:6]}:{uuid.uuid4().hex}"


def unique_settings(services: stack.StackConfig, prefix: str = "t", **overrides: Any) -> Settings:
    """Settings whose topic, group, Redis key and channel names are unique to one caller."""
    tag = f"{prefix}{uuid.uuid4().hex[:8]}"
    values: dict[str, Any] = {
        "kafka_bootstrap": f"127.0.0.1:{services.kafka_port}",
        "redis_url": f"redis://127.0.0.1:{services.redis_port}/0",
        "redis_password": services.redis_password or None,
        "app_id": f"{tag}-app",
        "plays_topic": f"{tag}-plays",
        "dlq_topic": f"{tag}-dlq",
        "control_topic": f"{tag}-control",
        "redis_prefix": f"{tag}:reco:",
        "similar_prefix": f"{tag}:similar:",
        "catalog_prefix": f"{tag}:track:",
        "notify_channel": f"{tag}:reco-updates",
        "metrics_port": free_port(),
        "partitions": 4,
        "redis_flush_interval_ms": 1.0,
        # workers restore and write checkpoints only with a key (stream.core.checkpoint)
        "checkpoint_keys": f"{tag}:{uuid.uuid4().hex}",
        # the workers sign and verify track signals and control commands (stream.processing.auth)
        "worker_keys": TEST_WORKER_KEYS,
    }
    return load_settings(env={}, file=None, **(values | overrides))


@pytest.fixture
def settings(services: stack.StackConfig) -> Settings:
    """Settings with names unique to this test."""
    return unique_settings(services)


def settings_env(s: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_")}
    for name, value in s.__class__.__dataclass_fields__.items():  # noqa: B007
        env[f"STREAM_{name.upper()}"] = str(getattr(s, name))
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class WorkerProcess:
    """A real `stream worker` subprocess."""

    settings: Settings
    log_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.metrics_port}/metrics"

    def start(self, timeout: float = 180.0) -> WorkerProcess:
        """Start and wait for Faust's "Ready". The bound is generous: on the shared 2-core
        box at load average ~18 a start (imports, numba cache load or compile in a fresh
        clone, topic creation, group join, changelog recovery) overran 90 s."""
        env = settings_env(self.settings) | self.extra_env
        # a restart appends to the same log: wait for a "Ready" of this start
        start_size = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stream.tools.cli", "worker"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_ready(timeout, start_size)
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float, start_size: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(
                    f"worker exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}"
                )
            if b"Worker]: Ready" in self.log_path.read_bytes()[start_size:]:
                return
            time.sleep(0.25)
        pytest.fail(f"worker not ready within {timeout}s:\n{self.log_text()[-4000:]}")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            return str(resp.read().decode())

    def samples(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        """The exported samples of ``name`` whose labels include ``labels``."""
        from prometheus_client.parser import text_string_to_metric_families

        return [
            (dict(sample.labels), sample.value)
            for family in text_string_to_metric_families(self.metrics())
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        ]

    def metric_value(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none is
        exported: to tell "0" from "absent", use :meth:`metric_sample`)."""
        return sum(value for _, value in self.samples(name, **labels))

    def metric_sample(self, name: str, **labels: str) -> float | None:
        """Like :meth:`metric_value`, but ``None`` when no such sample is exported."""
        found = self.samples(name, **labels)
        return sum(value for _, value in found) if found else None

    def stop(self, timeout: float = 40.0) -> int:
        """Graceful stop (SIGTERM): Faust commits offsets and flushes the changelog."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            pytest.fail(f"worker ignored SIGTERM for {timeout}s:\n{self.log_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def worker_factory(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start workers for this test's settings; all are stopped at teardown."""
    started: list[WorkerProcess] = []

    def make(s: Settings | None = None, **extra_env: str) -> WorkerProcess:
        w = WorkerProcess(
            s or settings, tmp_path / f"worker-{len(started)}.log", extra_env=dict(extra_env)
        )
        started.append(w)
        return w.start()

    yield make
    for w in started:
        w.stop()


def produce(settings: Settings, events: Iterable[PlayEvent | bytes], **kw: Any) -> int:
    return asyncio.run(produce_events(settings, events, progress=False, **kw))


@pytest.fixture
def reader(settings: Settings) -> Iterator[RecoReader]:
    r = RecoReader(
        settings.redis_url,
        password=settings.redis_password,
        prefix=settings.redis_prefix,
        similar_prefix=settings.similar_prefix,
        channel=settings.notify_channel,
        catalog_prefix=settings.catalog_prefix,
    )
    yield r
    # large SCAN pages: the shared Redis may hold ~10^6 keys of other runs, and the
    # teardown counts against the per-test timeout
    keys = list(r.client.scan_iter(match=f"{settings.redis_prefix}*", count=20_000))
    keys += list(r.client.scan_iter(match=f"model:{settings.app_id}*", count=20_000))
    keys += list(r.client.scan_iter(match=f"forgotten:{settings.app_id}*", count=20_000))
    keys += list(r.client.scan_iter(match=f"{settings.similar_prefix}*", count=20_000))
    keys += list(r.client.scan_iter(match=f"{settings.catalog_prefix}*", count=20_000))
    for i in range(0, len(keys), 500):
        r.client.delete(*keys[i : i + 500])
    r.close()


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.25, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until truthy (bounded); fail with ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Budget:
    """One wall-clock bound shared by several waits (e.g. a module fixture's, which all run
    inside the first test's per-test timeout): each step gets its own bound, cut to what is
    left of the whole."""

    def __init__(self, total_s: float, what: str) -> None:
        self.total_s = total_s
        self.what = what
        self.deadline = time.monotonic() + total_s

    def step(self, seconds: float) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"{self.what}: the {self.total_s:.0f} s budget is spent")
        return min(seconds, left)


def subscribe_confirmed(client: Any, channel: str, timeout: float = 30.0) -> Any:
    """A pub/sub connection subscribed to ``channel``, returned once the server has
    confirmed the subscription (so nothing published after this returns is missed).

    Subscribe confirmations are read, not ignored: with ``ignore_subscribe_messages=True``
    ``get_message`` returns ``None`` for the confirmation, which looks like "no message"."""
    pubsub = client.pubsub(ignore_subscribe_messages=False)
    pubsub.subscribe(channel)
    try:
        wait_until(
            lambda: (m := pubsub.get_message(timeout=0.2)) is not None
            and m["type"] == "subscribe",
            timeout,
            interval=0,
            what=f"the subscription to {channel!r} confirmed",
        )
    except BaseException:
        pubsub.close()
        raise
    return pubsub


def subscribers(client: Any, channel: str) -> int:
    """How many connections the server counts as subscribed to ``channel`` (PUBSUB NUMSUB).
    On a Redis Cluster redis-py sends NUMSUB to one default node, while the subscription sits
    on the node of the channel's slot: ask every node, and redis-py sums the replies."""
    kwargs: dict[str, Any] = {}
    if hasattr(client, "get_nodes"):  # redis.cluster.RedisCluster
        kwargs["target_nodes"] = client.ALL_NODES
    counts = {
        (k.decode() if isinstance(k, bytes) else k): int(v)
        for k, v in client.pubsub_numsub(channel, **kwargs)
    }
    return counts.get(channel, 0)


def wait_subscribed(client: Any, channel: str, n: int = 1, timeout: float = 30.0) -> None:
    """Until the server counts ``n`` subscribers on ``channel``: for a subscription made by
    another thread or process (pub/sub keeps no history, so publishing before it would be
    missed). ``client`` must be allowed PUBSUB NUMSUB."""
    wait_until(
        lambda: subscribers(client, channel) >= n,
        timeout,
        interval=0.02,
        what=f"{n} subscriber(s) on {channel!r}",
    )


def collect_notifications(
    pubsub: Any,
    done: Callable[[list[dict[str, Any]]], bool],
    timeout: float,
    what: str = "notifications",
) -> list[dict[str, Any]]:
    """Read notifications (JSON messages) from ``pubsub`` until ``done(notes)`` (bounded)."""
    import orjson

    notes: list[dict[str, Any]] = []

    def step() -> bool:
        m = pubsub.get_message(timeout=0.2)
        if m is not None and m["type"] == "message":
            notes.append(orjson.loads(m["data"]))
        return done(notes)

    wait_until(step, timeout, interval=0, what=what)
    return notes


def drain_notifications(pubsub: Any, quiet_s: float = 0.5) -> list[dict[str, Any]]:
    """What else arrives until the channel has been quiet for ``quiet_s``."""
    import orjson

    notes = []
    while (m := pubsub.get_message(timeout=quiet_s)) is not None:
        if m["type"] == "message":
            notes.append(orjson.loads(m["data"]))
    return notes


# --------------------------------------------------------------------------- private services
# For fault and security tests: instances this test may stop, restart or lock down. The
# shared stack (9092, 6379) is never touched.


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[..., stack.RedisServer]]:
    """``private_redis(*args, port=None)`` starts a redis-server on a free port (extra server
    options in ``args``); every one started is stopped at teardown."""
    servers: list[stack.RedisServer] = []

    def make(*args: str, port: int | None = None) -> stack.RedisServer:
        server = stack.RedisServer(
            tmp_path / f"redis-{len(servers)}",
            port if port is not None else free_port(),
            list(args),
        )
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate, made
    with ``openssl`` at test time."""
    d = tmp_path / "tls"
    d.mkdir()

    def run(*argv: str) -> None:
        subprocess.run(["openssl", *argv], cwd=d, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            f"{name}.pem",
        )
    return TlsFiles(
        d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key"
    )
