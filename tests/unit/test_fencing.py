"""The freeze fence's decision (stream.worker.fencing): pure, with a fake clock."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from stream.worker.fencing import EXIT_FENCED, FENCE_FRACTION, FreezeFence
from stream.worker.watchdog import LoopLagProbe


def _fence(holds: bool = True, session: float = 6.0) -> tuple[FreezeFence, list[float]]:
    fenced: list[float] = []
    return FreezeFence(session, holds_partitions=lambda: holds, on_fenced=fenced.append), fenced


def test_a_gap_over_half_the_session_fences_at_the_next_tick_or_check() -> None:
    fence, fenced = _fence()
    assert fence.limit_s == 6.0 * FENCE_FRACTION == 3.0
    assert not fence.beat(100.0)
    assert not fence.beat(102.9)  # 2.9 s: below the limit
    assert not fence.check(105.9)  # exactly the limit: not over it
    assert fence.check(106.0)  # the agent's check after a resume
    assert fenced == [pytest.approx(3.1)]
    assert fence.beat(110.0)  # the probe's tick
    assert fenced[-1] == pytest.approx(7.1)


def test_unarmed_before_the_first_tick_and_after_disarm() -> None:
    fence, fenced = _fence()
    assert not fence.check(1_000.0)  # no tick yet: start-up is not a freeze
    fence.beat(0.0)
    fence.disarm()  # the probe stopped (a graceful shutdown)
    assert not fence.check(60.0) and not fence.beat(61.0)
    assert not fence.beat(62.0)  # re-armed by the beat at 61
    assert fenced == []
    assert fence.beat(70.0) and fenced == [pytest.approx(8.0)]


def test_no_fence_while_the_worker_holds_no_partitions() -> None:
    fence, fenced = _fence(holds=False)
    fence.beat(0.0)
    assert not fence.beat(30.0) and fenced == []


def test_bad_settings_fail_naming_them() -> None:
    with pytest.raises(ValueError, match="session_timeout_s"):
        FreezeFence(0, holds_partitions=lambda: True)
    with pytest.raises(ValueError, match="fraction"):
        FreezeFence(6, holds_partitions=lambda: True, fraction=1.0)


@pytest.mark.asyncio
async def test_the_loop_lag_probe_beats_the_fence_and_disarms_it_when_it_stops() -> None:
    fence, fenced = _fence()
    probe = LoopLagProbe(on_lag=lambda s: None, interval_s=0.005, fence=fence)
    task = asyncio.create_task(probe.run())
    await asyncio.sleep(0.05)
    assert fence.last_tick is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fence.last_tick is None and fenced == []


def test_the_default_action_logs_and_exits_with_the_fenced_code_without_cleanup() -> None:
    """In a child process: a frozen loop (a stopped beat), the ERROR line naming the gap and
    the setting, exit code EXIT_FENCED, and no atexit handler run (os._exit)."""
    code = textwrap.dedent("""
        import atexit, logging
        from stream.worker.fencing import FreezeFence
        logging.basicConfig(level=logging.INFO)
        atexit.register(lambda: print("atexit ran", flush=True))
        fence = FreezeFence(6.0, holds_partitions=lambda: True)
        fence.beat(10.0)
        fence.check(14.5)
        print("not reached", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=os.environ.copy())
    assert done.returncode == EXIT_FENCED, done
    assert "event loop frozen for 4.5 s" in done.stderr
    assert "kafka_session_timeout_s=6" in done.stderr and "ERROR" in done.stderr
    assert "atexit ran" not in done.stdout and "not reached" not in done.stdout


def test_sigcont_after_a_stop_past_the_limit_exits_by_the_handler_alone() -> None:
    """A real SIGSTOP/SIGCONT of a child whose fence had one beat and no probe (so nothing
    but the SIGCONT handler can check): it ends with EXIT_FENCED (limit 0.5 s here: a 1 s
    session)."""
    code = textwrap.dedent("""
        import asyncio, sys, time
        from stream.worker.fencing import FreezeFence
        fence = FreezeFence(1.0, holds_partitions=lambda: True)
        fence.install_sigcont(time.monotonic)
        async def main():
            fence.beat(time.monotonic())
            print("ticking", flush=True)
            await asyncio.sleep(30)
        asyncio.run(main())
    """)
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=os.environ.copy()) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ticking"
            proc.send_signal(signal.SIGSTOP)
            time.sleep(1.0)
            proc.send_signal(signal.SIGCONT)
            _, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == EXIT_FENCED, err
    assert "event loop frozen for" in err
