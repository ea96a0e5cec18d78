"""Recovery against the real stack (issue #18 item 4): the RocksDB table store restarts from
the changelog tail, a standby takes a killed worker's partitions over, and a worker told to
stop while its broker is down still exits. The CI variant of ``python -m load_tests.faults
recovery`` (a few thousand listeners; the timings are reported by the drill, not asserted).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from load_tests import faults, recovery
from stream.config import Settings
from stream.tools import stack

from .conftest import free_port, unique_settings

pytestmark = pytest.mark.integration

USERS = 3000


@pytest.fixture(scope="module")
def drill(services: stack.StackConfig, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One drill run (RocksDB restart, then standby takeover) shared by the tests below."""
    s = unique_settings(services, prefix="rec")
    workdir = tmp_path_factory.mktemp("recovery")
    report = recovery.recovery_drill(
        s, workdir, recovery.Plan(users=USERS, modes=("rocksdb", "standby"),
                                  fresh_timeout_s=90.0, standby_catch_up_s=45.0))
    report["workdir"] = str(workdir)
    return report


def test_rocksdb_restart_reads_only_the_changelog_tail(drill: dict) -> None:
    plays = drill["plays"]
    cold = drill["rocksdb_cold_start"]
    # the first RocksDB start builds its files from the whole changelog ...
    assert cold["changelog_records_read"] >= plays
    r = drill["modes"]["rocksdb"]
    # ... a restart on the same data_dir reads only what came after its last record
    assert r["changelog_records_read"] < plays * 0.05, r["changelog_read_at_recovery"]
    assert set(r["changelog_read_at_recovery"]) == {0, 1, 2, 3}
    assert r["affected"]["fresh"] == r["affected"]["listeners"] > 0, r["per_listener_s"]


def test_a_standby_takes_a_killed_workers_partitions_over(drill: dict) -> None:
    r = drill["modes"]["standby"]
    taken = r["taken_over_partitions"]
    assert taken and len(taken) < drill["partitions"]
    # W2 took them from its standby copies: it did not replay them
    assert r["changelog_records_read_taken_over"] < drill["plays"] * 0.05, (
        r["changelog_read_at_recovery"])
    assert r["affected"]["fresh"] == r["affected"]["listeners"] > 0, r["per_listener_s"]
    assert r["ready_after_kill_s"] is None  # nobody restarted: the survivor served them


def test_nothing_is_lost_or_applied_twice_across_the_kills(drill: dict) -> None:
    c = drill["consistency"]
    assert c["users"] >= USERS
    assert (c["lost"], c["double_applied"], c["users_missing"]) == (0, 0, 0), c
    assert drill["worker_alive"]


def test_a_worker_told_to_stop_while_its_broker_is_down_exits(
    services: stack.StackConfig, tmp_path: Path
) -> None:
    """SIGKILL a private broker under load, then SIGTERM the worker: before the bounded stop
    it was still running 90 s later (stuck flushing its producer); now it exits within
    shutdown_timeout_s and says why."""
    cfg = stack.private_config(tmp_path / "kafka", kafka_port=free_port(),
                               controller_port=free_port())
    stack.start_kafka(cfg)
    s: Settings = unique_settings(services, prefix="stop").replace(
        kafka_bootstrap=f"127.0.0.1:{cfg.kafka_port}", shutdown_timeout_s=10.0)
    worker = recovery.DrillWorker(s, tmp_path / "worker.log")
    try:
        worker.start(120.0)
        events = faults.valid_events(8000, users=2000, seed=5, tag=s.app_id)
        asyncio.run(faults._produce(s, events))
        pid = stack._running_pid(cfg, "kafka", "kafka.Kafka")
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # the worker is still applying the plays
        time.sleep(3.0)
        assert worker.proc is not None and worker.proc.poll() is None
        began = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        try:
            code = worker.proc.wait(40.0)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 40 s after SIGTERM:\n{worker.run_log()[-3000:]}")
        took = time.monotonic() - began
        log = worker.run_log()
        assert "SIGTERM: stopping (at most 10 s, setting shutdown_timeout_s)" in log
        if code != 0:  # cut short: it must say why, and by which setting
            assert code == 70, log[-3000:]
            assert "did not stop within 10 s of SIGTERM (setting shutdown_timeout_s)" in log
        print(f"exit {code} {took:.1f} s after SIGTERM", file=sys.stderr)
    finally:
        if worker.proc is not None and worker.proc.poll() is None:
            os.killpg(worker.proc.pid, signal.SIGKILL)
        stack.stop_kafka(cfg)
