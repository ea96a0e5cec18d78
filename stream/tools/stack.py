"""The local stack without Docker: a real Apache Kafka (KRaft) broker, Redis and Prometheus on
127.0.0.1, each started from the machine's own packages / Maven Central jars.

``stream stack up`` is idempotent and waits until each service really answers (Kafka broker
metadata, Redis PING, Prometheus /-/ready). Logs and PID files live in the state directory
(``$STREAM_STATE_DIR``, default ``~/.local/state/stream-reco``); ``down`` stops only the
processes whose PID files it wrote, after checking the PID still runs what it started.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from stream.errors import StackError

ROOT: Final = Path(__file__).resolve().parents[2]
CONFIGS: Final = ROOT / "configs"
KAFKA_VERSION: Final = "4.1.1"  # keep in sync with configs/kafka/pom.xml
#: Metrics port Prometheus always scrapes for tests/integration/test_observability.py (the
#: worker it starts listens here), next to 8000 for a `stream worker` with default settings.
TEST_METRICS_PORT: Final = 9464
DEFAULT_METRICS_TARGETS: Final = f"127.0.0.1:8000,127.0.0.1:{TEST_METRICS_PORT}"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise StackError(f"{name} must be a port number, got {raw!r}") from None


@dataclass(frozen=True)
class StackConfig:
    state_dir: Path
    cache_dir: Path
    kafka_port: int
    controller_port: int
    redis_port: int
    prometheus_port: int
    metrics_targets: tuple[str, ...]
    redis_password: str

    @classmethod
    def from_env(cls) -> StackConfig:
        home = Path.home()
        state = Path(os.environ.get("STREAM_STATE_DIR", home / ".local/state/stream-reco"))
        cache = Path(os.environ.get("STREAM_CACHE_DIR", home / ".cache/stream-reco"))
        targets = os.environ.get("STREAM_STACK_METRICS_TARGETS", DEFAULT_METRICS_TARGETS)
        return cls(
            state_dir=state,
            cache_dir=cache,
            kafka_port=_env_int("STREAM_STACK_KAFKA_PORT", 9092),
            controller_port=_env_int("STREAM_STACK_CONTROLLER_PORT", 9093),
            redis_port=_env_int("STREAM_STACK_REDIS_PORT", 6379),
            prometheus_port=_env_int("STREAM_STACK_PROMETHEUS_PORT", 9090),
            metrics_targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
            redis_password=os.environ.get("STREAM_STACK_REDIS_PASSWORD", ""),
        )

    @property
    def kafka_libs(self) -> Path:
        return self.cache_dir / f"kafka-{KAFKA_VERSION}" / "libs"


def log(msg: str) -> None:
    print(f"[stack] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


def _pid_file(cfg: StackConfig, name: str) -> Path:
    return cfg.state_dir / "pids" / f"{name}.pid"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _running_pid(cfg: StackConfig, name: str, marker: str) -> int | None:
    """PID from our PID file if that process is alive and still runs what we started."""
    path = _pid_file(cfg, name)
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    cmd = _cmdline(pid)
    if cmd and marker in cmd:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        # a zombie has an empty cmdline; reaching here means it is really running
        return pid
    return None


def _alive(cfg: StackConfig, name: str) -> bool:
    """The process from our PID file exists and is not a zombie (marker not checked: the
    JVM launcher may re-exec itself right after start, briefly blanking its cmdline)."""
    try:
        pid = int(_pid_file(cfg, name).read_text().strip())
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _spawn(
    cfg: StackConfig, name: str, argv: list[str], cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """Start ``argv`` detached (its own session, log ``logs/NAME.out``), tracked by
    ``pids/NAME.pid``; ``env`` None: this process's environment."""
    logs = cfg.state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (cfg.state_dir / "pids").mkdir(parents=True, exist_ok=True)
    with (logs / f"{name}.out").open("ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=env,
            start_new_session=True,  # survives the CLI; `down` stops it by PID
        )
    # keep the handle: a process that stops a service it started itself (private instances
    # in tests) reaps it in _stop, and no "subprocess still running" warning fires
    _CHILDREN[proc.pid] = proc
    _await_cmdline(proc)
    # write and rename: a `stack down` or `status` reading at that moment sees the old
    # file or the new one, never an empty one (which _stop would unlink)
    tmp = _pid_file(cfg, name).with_suffix(".pid.tmp")
    tmp.write_text(str(proc.pid))
    os.replace(tmp, _pid_file(cfg, name))
    log(f"started {name} (pid {proc.pid}), log: {logs / (name + '.out')}")
    return proc.pid


def _await_cmdline(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Wait until the kernel shows ``proc``'s new command line. Popen returns once exec has
    closed its error pipe, but Linux fills in the new program's arguments a moment later;
    until then /proc/PID/cmdline reads empty and :func:`_running_pid` would take the process
    for not ours (seen on a loaded box: ``stream demo`` then gave up on a worker that was
    starting, and its clean-up dropped the PID file of a worker left running)."""
    deadline = time.monotonic() + timeout
    while not _cmdline(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)


def kill_now(cfg: StackConfig, name: str, marker: str) -> int | None:
    """SIGKILL the process ``name`` of this stack (a fault drill's crash) and reap it when
    this process started it, so it leaves no zombie (nor a "still running" warning at
    exit); its PID file stays, as a crash leaves it. The killed PID, or None if none ran."""
    pid = _running_pid(cfg, name, marker)
    if pid is None:
        return None
    os.kill(pid, signal.SIGKILL)
    _reap(pid)
    return pid


def _reap(pid: int) -> None:
    """Wait for ``pid`` if this process started it (no zombie, no "still running"
    warning at exit); a process someone else started is theirs to wait for."""
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        child.wait(10)


def _wait(name: str, check: object, timeout: float, pid_alive: object) -> None:
    deadline = time.monotonic() + timeout
    last_err = ""
    while time.monotonic() < deadline:
        if not pid_alive():  # type: ignore[operator]
            raise StackError(f"{name} exited during start-up; see its log in the state directory")
        try:
            if check():  # type: ignore[operator]
                return
        except Exception as exc:  # noqa: BLE001 - any failure just means "not ready yet"
            last_err = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    raise StackError(f"{name} did not become ready within {timeout:.0f}s ({last_err})")


def _start_service(
    cfg: StackConfig,
    name: str,
    marker: str,
    ports: tuple[int, ...],
    settings: str,
    ready: Callable[[], bool],
    spawn: Callable[[], object],
    timeout: float,
    ready_as: str,
) -> None:
    """Start service ``name`` (a process whose command line holds ``marker``) unless this
    stack already runs it ready: refuse ``ports`` held by a process this stack did not
    start (naming the ``settings`` that move them), ``spawn`` it when not running, and
    wait up to ``timeout`` s for ``ready``; the last log line says it is ``ready_as``."""
    if _running_pid(cfg, name, marker) and ready():
        log(f"{name} already running on 127.0.0.1:{ports[0]}")
        return
    for port in ports:
        if _port_open(port) and not _running_pid(cfg, name, marker):
            raise StackError(
                f"port {port} is already in use by a process this stack did not start; "
                f"stop it or set {settings}"
            )
    if _running_pid(cfg, name, marker) is None:
        spawn()
    _wait(name, ready, timeout, lambda: _alive(cfg, name))
    log(ready_as)


def _stop(cfg: StackConfig, name: str, marker: str, timeout: float = 30.0) -> bool:
    pid = _running_pid(cfg, name, marker)
    path = _pid_file(cfg, name)
    if pid is None:
        path.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _running_pid(cfg, name, marker) is not None:
        time.sleep(0.2)
    if _running_pid(cfg, name, marker) is not None:
        log(f"{name} did not stop after SIGTERM in {timeout:.0f}s; sending SIGKILL")
        os.kill(pid, signal.SIGKILL)
    _reap(pid)
    path.unlink(missing_ok=True)
    log(f"stopped {name} (pid {pid})")
    return True


# --------------------------------------------------------------------------- Kafka


def _require(tool: str, hint: str) -> str:
    found = shutil.which(tool)
    if not found:
        raise StackError(f"'{tool}' is not on PATH: {hint}")
    return found


def ensure_kafka_jars(cfg: StackConfig) -> Path:
    """Resolve the pinned broker jars from Maven Central into the cache (once)."""
    libs = cfg.kafka_libs
    if (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").exists():
        return libs
    mvn = _require("mvn", "install Maven (apt-get install maven) to fetch the Kafka broker jars")
    log(f"resolving Apache Kafka {KAFKA_VERSION} jars from Maven Central into {libs} ...")
    tmp = libs.with_name("libs.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(CONFIGS / "kafka" / "pom.xml"),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}",
            "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise StackError(f"Maven could not resolve the Kafka jars:\n{proc.stdout[-2000:]}")
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    return libs


def _kafka_properties(cfg: StackConfig) -> Path:
    data = cfg.state_dir / "kafka" / "data"
    data.mkdir(parents=True, exist_ok=True)
    text = (CONFIGS / "kafka" / "server.properties").read_text()
    text = (
        text.replace("${broker_port}", str(cfg.kafka_port))
        .replace("${controller_port}", str(cfg.controller_port))
        .replace("${log_dir}", str(data))
    )
    out = cfg.state_dir / "kafka" / "server.properties"
    out.write_text(text)
    return out


def _java_base(cfg: StackConfig, libs: Path, logs: Path | None = None) -> list[str]:
    java = _require("java", "install a JDK >= 17 (apt-get install openjdk-17-jre-headless)")
    logs = logs or cfg.state_dir / "kafka" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return [
        java,
        "-Xms256m",
        "-Xmx1g",
        "-XX:+UseG1GC",
        "-Djava.awt.headless=true",
        f"-Dkafka.logs.dir={logs}",
        f"-Dlog4j2.configurationFile={CONFIGS / 'kafka' / 'log4j2.yaml'}",
        "-cp",
        f"{libs}/*",
    ]


def kafka_ready(port: int, **security: str) -> bool:
    """True when the broker answers a metadata request (not merely an open port);
    ``security``: the admin client's security settings, if the listener wants any."""
    from aiokafka.admin import AIOKafkaAdminClient

    async def probe() -> bool:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=3000, **security
        )
        try:
            await asyncio.wait_for(admin.start(), 5)
            cluster = await asyncio.wait_for(admin.describe_cluster(), 5)
            return bool(cluster.get("brokers"))
        finally:
            await admin.close()

    return asyncio.run(probe())


def _format_storage(cfg: StackConfig, libs: Path, props: Path) -> None:
    """Format the KRaft log directory once (a fresh cluster id); no-op when formatted."""
    data = cfg.state_dir / "kafka" / "data"
    if (data / "meta.properties").exists():
        return
    cid = "-"
    while cid.startswith("-"):  # as Kafka's Uuid.randomUuid: "-..." reads as an option
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    argv = [*_java_base(cfg, libs), "kafka.tools.StorageTool", "format", "-t", cid, "-c"]
    proc = subprocess.run([*argv, str(props)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise StackError(f"kafka storage format failed:\n{proc.stdout}\n{proc.stderr}")
    log(f"formatted KRaft storage in {data} (cluster id {cid})")


def start_kafka(cfg: StackConfig) -> None:
    def spawn() -> None:
        libs = ensure_kafka_jars(cfg)
        props = _kafka_properties(cfg)
        _format_storage(cfg, libs, props)
        _spawn(cfg, "kafka", [*_java_base(cfg, libs), "kafka.Kafka", str(props)])

    _start_service(
        cfg, "kafka", "kafka.Kafka", (cfg.kafka_port, cfg.controller_port),
        "STREAM_STACK_KAFKA_PORT / STREAM_STACK_CONTROLLER_PORT",
        lambda: _port_open(cfg.kafka_port) and kafka_ready(cfg.kafka_port), spawn, 90,
        f"kafka {KAFKA_VERSION} ready on 127.0.0.1:{cfg.kafka_port}",
    )


# --------------------------------------------------------------------------- Redis


def redis_ready(port: int, password: str = "") -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        if password:
            s.sendall(f"AUTH {password}\r\n".encode())
            s.recv(64)
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")


def start_redis(cfg: StackConfig) -> None:
    _start_service(
        cfg, "redis", "redis-server", (cfg.redis_port,), "STREAM_STACK_REDIS_PORT",
        lambda: redis_ready(cfg.redis_port, cfg.redis_password), lambda: _spawn_redis(cfg),
        30, f"redis ready on 127.0.0.1:{cfg.redis_port}",
    )


def redis_argv(server: str, port: int, workdir: Path, logfile: str = "") -> list[str]:
    """A local ``redis-server``'s command line: 127.0.0.1 only, in the foreground, no
    persistence (``logfile`` empty: the log goes to its stdout)."""
    return [
        server,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(workdir),
        "--daemonize", "no",
        "--save", "",
        "--appendonly", "no",
        "--logfile", logfile,
    ]  # fmt: skip


def _spawn_redis(cfg: StackConfig) -> None:
    server = _require("redis-server", "install Redis (apt-get install redis-server)")
    workdir = cfg.state_dir / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    argv = redis_argv(server, cfg.redis_port, workdir)
    if cfg.redis_password:
        argv += ["--requirepass", cfg.redis_password]
    _spawn(cfg, "redis", argv)


# --------------------------------------------------------------------------- Prometheus


def prometheus_config(cfg: StackConfig) -> Path:
    """configs/prometheus/prometheus.yml with local targets and absolute rule paths."""
    text = (CONFIGS / "prometheus" / "prometheus.yml").read_text()
    targets = ", ".join(f'"{t}"' for t in cfg.metrics_targets)
    text = text.replace('["worker:8000"]', f"[{targets}]")
    text = text.replace("/etc/prometheus/rules/", str(CONFIGS / "prometheus" / "rules") + "/")
    out = cfg.state_dir / "prometheus" / "prometheus.yml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def prometheus_ready(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as resp:
        return bool(resp.status == 200)


def prometheus_args(cfg: StackConfig) -> list[str]:
    """The local Prometheus's flags (renders its config). No ``--web.enable-lifecycle``:
    anyone who reaches the port could otherwise shut it down or reload it over HTTP;
    :func:`reload_prometheus` signals the process instead."""
    data = cfg.state_dir / "prometheus" / "data"
    data.mkdir(parents=True, exist_ok=True)
    return [
        f"--config.file={prometheus_config(cfg)}",
        f"--storage.tsdb.path={data}",
        f"--web.listen-address=127.0.0.1:{cfg.prometheus_port}",
        "--storage.tsdb.retention.time=2d",
    ]


def reload_prometheus(cfg: StackConfig) -> bool:
    """Make the stack's Prometheus re-read its config and rule files, as rendered at its
    start (SIGHUP, which only the user running the stack can send). False if this stack
    runs no Prometheus."""
    pid = _running_pid(cfg, "prometheus", "prometheus")
    if pid is None:
        return False
    os.kill(pid, signal.SIGHUP)
    return True


def start_prometheus(cfg: StackConfig) -> None:
    def spawn() -> None:
        binary = _require("prometheus", "install Prometheus (apt-get install prometheus)")
        _spawn(cfg, "prometheus", [binary, *prometheus_args(cfg)])

    _start_service(
        cfg, "prometheus", "prometheus", (cfg.prometheus_port,),
        "STREAM_STACK_PROMETHEUS_PORT", lambda: prometheus_ready(cfg.prometheus_port), spawn,
        60, f"prometheus ready on http://127.0.0.1:{cfg.prometheus_port}",
    )


# --------------------------------------------------------------------------- commands

SERVICES: Final = {
    "kafka": ("kafka.Kafka", start_kafka),
    "redis": ("redis-server", start_redis),
    "prometheus": ("prometheus", start_prometheus),
}


def _start_kafka_secure(cfg: StackConfig) -> None:
    from stream.tools import stack_secure

    stack_secure.up(cfg)


#: started only when named (`stream stack up kafka-secure`); a bare `down` stops them too
OPTIONAL_SERVICES: Final = {
    "kafka-secure": ("kafka-secure/server.properties", _start_kafka_secure),
}


def up(cfg: StackConfig, services: list[str]) -> None:
    for name in services:
        (SERVICES | OPTIONAL_SERVICES)[name][1](cfg)


#: what the PID file ``pids/worker.pid`` must run (a detached ``stream demo`` worker)
WORKER_MARKER = "stream.tools.cli worker"


def spawn_worker(cfg: StackConfig, env: dict[str, str]) -> int:
    """Start ``stream worker`` detached (its own session, log ``logs/worker.out``), tracked
    by ``pids/worker.pid`` so ``stream stack down`` stops it (before Kafka and Redis). A
    worker this stack started before is stopped first."""
    stop_worker(cfg)
    return _spawn(cfg, "worker", [sys.executable, "-m", "stream.tools.cli", "worker"], env=env)


def worker_pid(cfg: StackConfig) -> int | None:
    """The detached worker this stack started, if it still runs."""
    return _running_pid(cfg, "worker", WORKER_MARKER)


def stop_worker(cfg: StackConfig) -> bool:
    """Stop the detached worker (SIGTERM: it commits and drains first). Whether one ran."""
    return _stop(cfg, "worker", WORKER_MARKER, timeout=45.0)


def down(cfg: StackConfig, services: list[str]) -> None:
    if "kafka" in services or "redis" in services:
        stop_worker(cfg)  # it needs both: stopped first, cleanly
    for name in reversed(services):
        stopped = _stop(cfg, name, (SERVICES | OPTIONAL_SERVICES)[name][0])
        if not stopped and name in SERVICES:
            log(f"{name}: not running (nothing this stack started)")


def status(cfg: StackConfig) -> dict[str, dict[str, object]]:
    ports = {"kafka": cfg.kafka_port, "redis": cfg.redis_port, "prometheus": cfg.prometheus_port}
    checks = {
        "kafka": lambda: kafka_ready(cfg.kafka_port),
        "redis": lambda: redis_ready(cfg.redis_port, cfg.redis_password),
        "prometheus": lambda: prometheus_ready(cfg.prometheus_port),
    }
    out: dict[str, dict[str, object]] = {}
    for name, (marker, _) in SERVICES.items():
        pid = _running_pid(cfg, name, marker)
        try:
            ok = bool(pid) and checks[name]()
        except Exception:  # noqa: BLE001
            ok = False
        out[name] = {"pid": pid, "port": ports[name], "ready": ok}
    from stream.tools import stack_secure

    secure = stack_secure.SecureKafka.from_stack(cfg)
    pid = stack_secure.running(secure)
    if pid is not None:  # listed only while running: it is not part of the default stack
        try:
            ok = stack_secure.ready(secure)
        except Exception:  # noqa: BLE001
            ok = False
        out["kafka-secure"] = {"pid": pid, "port": secure.port, "ready": ok}
    return out


# --------------------------------------------------------------------------- private instances
# Fault drills and security tests need services they may stop, restart or lock down without
# touching the shared stack: same code paths, a separate state dir and ports.


def private_config(
    state_dir: Path,
    *,
    kafka_port: int = 0,
    controller_port: int = 0,
    redis_port: int = 0,
    redis_password: str = "",
) -> StackConfig:
    """A StackConfig for a private instance (own state dir and ports, shared jar cache)."""
    base = StackConfig.from_env()
    return StackConfig(
        state_dir=state_dir,
        cache_dir=base.cache_dir,
        kafka_port=kafka_port,
        controller_port=controller_port,
        redis_port=redis_port,
        prometheus_port=0,
        metrics_targets=(),
        redis_password=redis_password,
    )


def stop_kafka(cfg: StackConfig) -> bool:
    """Stop the broker this ``cfg`` started (SIGTERM, then SIGKILL after 30 s)."""
    return _stop(cfg, "kafka", "kafka.Kafka")


def sasl_kafka_properties(cfg: StackConfig, users: dict[str, str]) -> Path:
    """configs/kafka/server.properties with the client listener switched to SASL_PLAINTEXT
    (mechanism PLAIN, ``users`` as the JAAS user list). The first user is the broker's own
    inter-broker identity; the controller listener stays PLAINTEXT on 127.0.0.1."""
    if not users:
        raise StackError("a SASL broker needs at least one user")
    props = _kafka_properties(cfg)
    text = props.read_text()
    text = text.replace("PLAINTEXT://127.0.0.1:", "SASL_PLAINTEXT://127.0.0.1:").replace(
        "inter.broker.listener.name=PLAINTEXT", "inter.broker.listener.name=SASL_PLAINTEXT"
    )
    text = text.replace(
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,",
        "listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,",
    )
    admin, admin_pw = next(iter(users.items()))
    jaas_users = " ".join(f'user_{u}="{p}"' for u, p in users.items())
    text += (
        "\n# SASL variant rendered by stream.tools.stack.sasl_kafka_properties\n"
        "sasl.enabled.mechanisms=PLAIN\n"
        "sasl.mechanism.inter.broker.protocol=PLAIN\n"
        "listener.name.sasl_plaintext.plain.sasl.jaas.config="
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'username="{admin}" password="{admin_pw}" {jaas_users};\n'
    )
    props.write_text(text)
    props.chmod(0o600)  # it holds passwords
    return props


def kafka_sasl_ready(port: int, username: str, password: str) -> bool:
    """Like :func:`kafka_ready`, authenticating with SASL/PLAIN."""
    return kafka_ready(
        port, security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
        sasl_plain_username=username, sasl_plain_password=password,
    )


def start_sasl_kafka(cfg: StackConfig, users: dict[str, str], timeout: float = 90) -> None:
    """Start a private broker whose client listener requires SASL/PLAIN (see
    :func:`sasl_kafka_properties`). The default stack is unaffected."""
    for port in (cfg.kafka_port, cfg.controller_port):
        if _port_open(port):
            raise StackError(f"port {port} is already in use")
    libs = ensure_kafka_jars(cfg)
    props = sasl_kafka_properties(cfg, users)
    _format_storage(cfg, libs, props)
    _spawn(cfg, "kafka", [*_java_base(cfg, libs), "kafka.Kafka", str(props)])
    user, password = next(iter(users.items()))
    _wait(
        "kafka (SASL)",
        lambda: _port_open(cfg.kafka_port) and kafka_sasl_ready(cfg.kafka_port, user, password),
        timeout,
        lambda: _alive(cfg, "kafka"),
    )
    log(f"kafka (SASL_PLAINTEXT/PLAIN) ready on 127.0.0.1:{cfg.kafka_port}")


@dataclass
class RedisServer:
    """A private ``redis-server`` on its own port and directory that a test may stop and
    start at will (outage drills) or lock down (``--requirepass``, ACL users, TLS).

    ``args`` are extra server options, e.g. ``["--requirepass", "pw"]`` or
    ``["--port", "0", "--tls-port", "7001", "--tls-cert-file", ...]``.
    """

    workdir: Path
    port: int
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> RedisServer:
        server = _require("redis-server", "install Redis (apt-get install redis-server)")
        if _port_open(self.port):
            raise StackError(f"port {self.port} is already in use")
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [*redis_argv(server, self.port, self.workdir, str(self.workdir / "redis.log")),
                *self.args]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StackError(
                    f"private redis-server exited with {self.proc.returncode}; "
                    f"see {self.workdir / 'redis.log'}"
                )
            if self._listening():
                return self
            time.sleep(0.1)
        raise StackError(f"private redis-server not listening within {timeout:.0f}s")

    def _listening(self) -> bool:
        tls = "--tls-port" in self.args
        port = int(self.args[self.args.index("--tls-port") + 1]) if tls else self.port
        if port == 0:
            return False
        return _port_open(port)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# --------------------------------------------------------------------------- Redis ACL

#: the ACL users of configs/redis/users.acl.in
REDIS_ACL_USERS: Final = ("stream-admin", "stream-worker", "stream-reader")


def render_redis_acl(dest: Path, passwords: Mapping[str, str]) -> Path:
    """Write ``configs/redis/users.acl.in`` as a loadable aclfile at ``dest``: comment lines
    dropped, each user's password as its SHA-256 (the file holds no password). Every user
    of :data:`REDIS_ACL_USERS` needs a non-empty password in ``passwords``."""
    missing = [u for u in REDIS_ACL_USERS if not passwords.get(u)]
    if missing:
        raise StackError(f"no password for the Redis ACL user(s) {', '.join(missing)}")
    text = (CONFIGS / "redis" / "users.acl.in").read_text()
    for user in REDIS_ACL_USERS:
        digest = hashlib.sha256(passwords[user].encode()).hexdigest()
        placeholder = "@" + user.removeprefix("stream-").upper() + "_PASSWORD_SHA256@"
        text = text.replace(placeholder, digest)
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if any("_PASSWORD_SHA256@" in ln for ln in lines):
        raise StackError("configs/redis/users.acl.in has a placeholder nobody fills in")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n".join(lines) + "\n")
    dest.chmod(0o600)
    return dest


def start_acl_redis(
    workdir: Path, port: int, passwords: Mapping[str, str], *args: str
) -> RedisServer:
    """A private redis-server on ``port`` that admits only the users of
    ``configs/redis/users.acl.in`` (the default user is off). Raises StackError if it
    does not start or its aclfile does not load (the server refuses to start then)."""
    acl = render_redis_acl(workdir / "users.acl", passwords)
    server = RedisServer(workdir, port, ["--aclfile", str(acl), *args]).start()
    import redis  # here: `stream stack` itself runs without the client library

    client = redis.Redis(
        port=port, username="stream-admin", password=passwords["stream-admin"], socket_timeout=5
    )
    try:
        if not client.ping():
            raise StackError(f"redis-server with ACL users on {port} does not answer PING")
    except redis.RedisError as exc:
        server.stop()
        raise StackError(f"redis-server with ACL users on {port}: {exc}") from exc
    finally:
        client.close()
    return server
