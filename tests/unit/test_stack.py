"""The local stack's guard rails (no services started here)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from stream.errors import StackError
from stream.tools import stack


def cfg(tmp_path: Path, **ports: int) -> stack.StackConfig:
    return stack.StackConfig(
        state_dir=tmp_path / "state",
        cache_dir=tmp_path / "cache",
        kafka_port=ports.get("kafka", 1),
        controller_port=ports.get("controller", 2),
        redis_port=ports.get("redis", 3),
        prometheus_port=ports.get("prometheus", 4),
        metrics_targets=("127.0.0.1:8000", "127.0.0.1:9464"),
        redis_password="",
    )


@pytest.mark.parametrize("service", ["redis", "prometheus", "kafka"])
def test_a_port_taken_by_someone_else_is_a_clear_error(tmp_path: Path, service: str) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        c = cfg(tmp_path, **{service: port})
        with pytest.raises(StackError, match=f"port {port} is already in use"):
            stack.SERVICES[service][1](c)


def test_missing_tools_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    c = cfg(tmp_path)
    with pytest.raises(StackError, match="'mvn' is not on PATH: install Maven"):
        stack.ensure_kafka_jars(c)
    with pytest.raises(StackError, match="'redis-server' is not on PATH"):
        stack.start_redis(cfg(tmp_path, redis=free_port()))


def test_prometheus_config_points_at_local_workers_and_rules(tmp_path: Path) -> None:
    text = stack.prometheus_config(cfg(tmp_path)).read_text()
    assert '"127.0.0.1:8000", "127.0.0.1:9464"' in text
    assert '["worker:8000"]' not in text
    assert str(stack.CONFIGS / "prometheus" / "rules") in text


def test_down_stops_nothing_it_did_not_start(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    (c.state_dir / "pids").mkdir(parents=True)
    (c.state_dir / "pids" / "redis.pid").write_text("1")  # PID 1 is not our redis-server
    stack.down(c, ["redis"])
    assert not (c.state_dir / "pids" / "redis.pid").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_down_stops_the_detached_demo_worker_first(tmp_path: Path) -> None:
    """`stream stack down` stops a worker `stream demo` left running (tracked by its PID
    file), and only a process that really runs `stream.tools.cli worker`."""
    import subprocess
    import sys
    import time

    c = cfg(tmp_path)
    (c.state_dir / "pids").mkdir(parents=True)
    # a stand-in for the worker: its command line carries the marker; it sleeps until stopped
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "stream.tools.cli", "worker"],
        start_new_session=True,
    )
    try:
        (c.state_dir / "pids" / "worker.pid").write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + 10  # until the child has exec'd (its cmdline is set)
        while stack.worker_pid(c) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stack.worker_pid(c) == proc.pid
        stack.down(c, ["redis"])  # nothing of ours on the redis port: only the worker stops
        assert proc.wait(10) != 0
        assert stack.worker_pid(c) is None
        assert not (c.state_dir / "pids" / "worker.pid").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    # a PID file pointing at something else is left alone
    (c.state_dir / "pids" / "worker.pid").write_text("1")
    assert stack.worker_pid(c) is None and not stack.stop_worker(c)


def test_prometheus_has_no_http_lifecycle_api(tmp_path: Path) -> None:
    """Without --web.enable-lifecycle nobody who merely reaches the port can POST
    /-/quit or /-/reload; the stack reloads by signal (reload_prometheus)."""
    args = stack.prometheus_args(cfg(tmp_path, prometheus=9999))
    assert not any("lifecycle" in a for a in args)
    assert "--web.listen-address=127.0.0.1:9999" in args
    assert stack.reload_prometheus(cfg(tmp_path)) is False  # none started by this stack


def test_redis_acl_is_rendered_without_passwords_or_comments(tmp_path: Path) -> None:
    import hashlib

    passwords = {u: f"pw-of-{u}" for u in stack.REDIS_ACL_USERS}
    path = stack.render_redis_acl(tmp_path / "users.acl", passwords)
    lines = path.read_text().splitlines()
    assert all(line.startswith("user ") for line in lines)  # redis-server allows no comments
    assert [line.split()[1] for line in lines] == ["default", *stack.REDIS_ACL_USERS]
    text = path.read_text()
    for pw in passwords.values():
        assert pw not in text
        assert "#" + hashlib.sha256(pw.encode()).hexdigest() in text
    assert "_PASSWORD_SHA256@" not in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert lines[0] == "user default off resetkeys resetchannels -@all"
    with pytest.raises(StackError, match="stream-reader"):
        stack.render_redis_acl(tmp_path / "x.acl", {**passwords, "stream-reader": ""})


def test_spawn_waits_until_the_kernel_shows_the_new_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Popen returns before Linux fills in the exec'd program's arguments: /proc/PID/cmdline
    reads empty for a moment, and `stream demo` took its starting worker for gone (CI, session
    18). _spawn waits for the command line, so the PID file is ours as soon as it exists."""
    import sys

    real = stack._cmdline
    calls = {"n": 0}

    def late_cmdline(pid: int) -> str:
        calls["n"] += 1
        return "" if calls["n"] <= 5 else real(pid)  # the window, made long

    monkeypatch.setattr(stack, "_cmdline", late_cmdline)
    c = cfg(tmp_path)
    pid = stack._spawn(
        c, "worker", [sys.executable, "-c", "import time; time.sleep(60)", "stream.tools.cli",
                      "worker"],
    )
    try:
        assert stack.worker_pid(c) == pid
        assert stack.stop_worker(c)
    finally:  # by the handle: a failed stop_worker drops the PID file, leaving the child
        child = stack._CHILDREN.pop(pid, None)
        if child is not None and child.poll() is None:
            child.kill()
            child.wait(10)


def test_spawn_does_not_wait_for_the_command_line_of_a_child_that_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait for the command line ends when the child exits (its cmdline never shows),
    not at its 5 s bound; the start-up check then reports the exit."""
    import sys
    import time

    monkeypatch.setattr(stack, "_cmdline", lambda pid: "")  # never shows, as for a zombie
    c = cfg(tmp_path)
    t0 = time.monotonic()
    pid = stack._spawn(c, "worker", [sys.executable, "-c", "pass"])
    assert time.monotonic() - t0 < 3.0
    assert stack._CHILDREN.pop(pid).returncode == 0  # reaped by the wait's poll
    with pytest.raises(StackError, match="exited during start-up"):
        stack._wait("worker", lambda: False, 5, lambda: stack._alive(c, "worker"))


def test_demo_finds_ready_after_a_log_of_multibyte_lines(tmp_path: Path) -> None:
    """The demo's start offset counts bytes; Faust's tables in earlier runs' lines are
    multi-byte, so a text slice at that offset would skip this run's first lines."""
    from stream.tools.demo import _ready_since

    log = tmp_path / "worker.out"
    log.write_text("┌────────────┐\n│ old run    │\n└────────────┘\n" * 50)
    start = log.stat().st_size
    with log.open("a") as out:
        out.write("[2026-12-05 18:58:07,699] [1] [INFO] [^SeamWorker]: Ready\n")
    assert _ready_since(log, start)
    assert not _ready_since(log, log.stat().st_size)


def test_kill_now_crashes_and_reaps_a_service_this_process_started(tmp_path: Path) -> None:
    """Fault drills SIGKILL a node: kill_now reaps it when we started it (no zombie, no
    "still running" warning at exit) and leaves the PID file, as a crash would."""
    import sys

    c = cfg(tmp_path)
    pid = stack._spawn(
        c, "worker", [sys.executable, "-c", "import time; time.sleep(60)", "stream.tools.cli",
                      "worker"],
    )
    child = stack._CHILDREN[pid]
    assert stack.kill_now(c, "worker", stack.WORKER_MARKER) == pid
    assert child.returncode == -9 and pid not in stack._CHILDREN
    assert (c.state_dir / "pids" / "worker.pid").exists()
    assert stack.worker_pid(c) is None
    assert stack.kill_now(c, "worker", stack.WORKER_MARKER) is None
