"""The bounded stop (stream.faustx.shutdown): a worker that cannot stop cleanly still exits.
Both bounds are installed through Faust's extension points (the seam app's ``_producer_flush``
override, its ``Worker`` class), not on live objects."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from typing import Any

import faust
import mode
import pytest

from stream.config import Settings, load_settings
from stream.faustx import shutdown
from stream.faustx.app import create_app


def _settings(**overrides: Any) -> Settings:
    return load_settings(env={}, file=None, app_id="stop-test", **overrides)


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
    app = create_app(_settings(shutdown_timeout_s=3.0), partitions=1)
    assert app.seam.stop_timeout_s == 3.0

    class Producer:
        async def flush(self) -> None:
            await asyncio.sleep(60)  # a broker that never answers

    app._producer = Producer()
    with caplog.at_level(logging.WARNING, logger="stream.faustx.shutdown"):
        await asyncio.wait_for(app._producer_flush(logging.getLogger("test")), 5)
    assert "could not deliver its buffered records within 1.0 s" in caplog.text
    assert "giving up on them" in caplog.text


def test_the_apps_worker_class_arms_the_deadline_on_the_stop_signal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = create_app(_settings(shutdown_timeout_s=30.0), partitions=1)
    assert app.conf.Worker is shutdown.SeamWorker
    scheduled: list[Any] = []
    # the upstream method (mode.Worker._schedule_shutdown) starts the real stop: record it
    monkeypatch.setattr(mode.Worker, "_schedule_shutdown",
                        lambda self, sig: scheduled.append(sig))
    worker = app.worker(quiet=True, redirect_stdouts=False)
    deadline = worker.stop_deadline
    assert deadline is not None and deadline.timeout_s == 30.0
    worker._schedule_shutdown(signal.SIGTERM)
    try:
        assert scheduled == [signal.SIGTERM]
        assert deadline._timer is not None and deadline._timer.is_alive()
    finally:
        deadline.cancel()


def test_a_plain_app_keeps_fausts_unbounded_stop() -> None:
    app = faust.App("plain-stop", autodiscover=False, web_enabled=False)
    worker = shutdown.SeamWorker(app, quiet=True, redirect_stdouts=False)
    assert worker.stop_deadline is None


def test_the_worker_keeps_its_command_line_when_setproctitle_is_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """faust.Worker retitles the process through the optional setproctitle package (with
    faust-streaming[fast]); `stream stack` finds its detached worker by the command line, so
    the seam's worker keeps it."""
    import faust.worker

    titles: list[str] = []
    monkeypatch.setattr(faust.worker, "setproctitle", titles.append)
    app = faust.App("title-kept", autodiscover=False, web_enabled=False)
    plain = faust.Worker(app, quiet=True, redirect_stdouts=False)
    plain._setproctitle("init")
    assert titles, "faust.Worker no longer calls setproctitle: the override is moot"
    titles.clear()
    worker = shutdown.SeamWorker(app, quiet=True, redirect_stdouts=False)
    worker._setproctitle("init")
    worker._setproctitle("stopping")
    assert titles == []
