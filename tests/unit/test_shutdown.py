"""The bounded stop (stream.faustx.shutdown): a worker that cannot stop cleanly still exits."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from typing import Any

import pytest

from stream.faustx import shutdown


def test_the_deadline_logs_the_last_step_and_what_is_pending_then_exits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exited = threading.Event()
    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        exited.set()

    deadline = shutdown.ShutdownDeadline(0.2, describe=lambda: "3 changelog records",
                                         exit=fake_exit)
    with caplog.at_level(logging.INFO, logger="mode"):
        logging.getLogger("mode").info("[^-App]: Flush producer buffer...")
    with caplog.at_level(logging.INFO, logger="stream.faustx.shutdown"):
        deadline.arm("SIGTERM")
        deadline.arm("SIGINT")  # a second signal does not re-arm it
        assert exited.wait(5)
    assert codes == [shutdown.EXIT_STOP_TIMEOUT]
    error = [r for r in caplog.records if r.levelno == logging.ERROR][-1].getMessage()
    assert "did not stop within 0 s of SIGTERM" in error
    assert "shutdown_timeout_s" in error and "Flush producer buffer" in error
    assert "3 changelog records" in error


def test_a_clean_stop_cancels_the_deadline() -> None:
    codes: list[int] = []
    deadline = shutdown.ShutdownDeadline(0.3, exit=codes.append)
    deadline.arm("SIGTERM")
    deadline.cancel()
    threading.Event().wait(0.6)
    assert codes == []


@pytest.mark.asyncio
async def test_the_stop_flush_gives_up_after_its_bound(caplog: pytest.LogCaptureFixture) -> None:
    class App:
        async def _producer_flush(self, log: Any) -> None:
            await asyncio.sleep(60)  # a broker that never answers

    app = App()
    shutdown.bound_stop_flush(app, 0.1)
    with caplog.at_level(logging.WARNING, logger="stream.faustx.shutdown"):
        await asyncio.wait_for(app._producer_flush(None), 5)
    assert "giving up on them" in caplog.text


def test_install_arms_the_deadline_on_the_workers_stop_signal() -> None:
    scheduled: list[Any] = []

    class FaustWorker:
        def _schedule_shutdown(self, sig: signal.Signals) -> None:
            scheduled.append(sig)

    class App:
        async def _producer_flush(self, log: Any) -> None: ...

    worker = FaustWorker()
    deadline = shutdown.install(worker, App(), 30.0)
    worker._schedule_shutdown(signal.SIGTERM)
    try:
        assert scheduled == [signal.SIGTERM]
        assert deadline._timer is not None and deadline._timer.is_alive()
    finally:
        deadline.cancel()


def test_install_fails_loudly_on_an_unknown_faust() -> None:
    with pytest.raises(RuntimeError, match="faust-streaming 0.15.3"):
        shutdown.bound_stop_flush(object(), 1.0)
