"""A bounded stop: a SIGTERMed (or Ctrl-C'd) worker exits within ``shutdown_timeout_s``.

Faust's stop flushes its producer and waits for every buffered record to be acknowledged;
aiokafka retries an unreachable broker for ``producer_request_timeout`` (20 minutes in
Faust). A worker told to stop while its broker was down therefore did not exit (issue #18:
not within 40 s; reproduced with a private broker SIGKILLed under load: still running
after 90 s, stuck at "Flush producer buffer...").

Two bounds, both logged, both installed through Faust's own extension points (method
overrides on the seam's classes, the upstream functions pinned in :mod:`stream.faustx.compat`):

- the producer flush at stop (``SeamApp._producer_flush``) gives up after a third of the
  budget (the records it gave up on are changelog/DLQ/signal records whose plays' offsets
  were *not* committed: the commit waits for their delivery, so a restart applies those
  plays again, as after a crash);
- a deadline armed by the signal (:class:`SeamWorker`, the app's ``Worker`` class): if the
  worker is still stopping after ``shutdown_timeout_s`` it logs what it was waiting for and
  exits with status 70 (``os._exit``: nothing else could finish it). Again nothing
  acknowledged is lost: the offsets committed are those of plays whose state reached Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from signal import Signals
from typing import Any, Final

import faust

from stream.faustx.options import seam_options

logger = logging.getLogger(__name__)

#: exit status of a stop cut short by the deadline (EX_SOFTWARE)
EXIT_STOP_TIMEOUT: Final = 70


class _LastStep(logging.Handler):
    """Remembers the last INFO+ line Faust/mode logged (its "Stopping..." steps)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # a log line must never break the stop
            self.last = record.getMessage()[:200]


class ShutdownDeadline:
    """Arms a timer at the first stop signal; if the process is still alive when it fires,
    log why and exit with :data:`EXIT_STOP_TIMEOUT`."""

    def __init__(self, timeout_s: float, describe: Callable[[], str] | None = None,
                 exit: Callable[[int], Any] = os._exit) -> None:
        self.timeout_s = timeout_s
        self.describe = describe
        self._exit = exit
        self._timer: threading.Timer | None = None
        self._armed_at = 0.0
        self._signal = ""
        self.step = _LastStep()
        for name in ("faust", "mode"):
            logging.getLogger(name).addHandler(self.step)

    def arm(self, signame: str) -> None:
        if self._timer is not None:
            return
        self._signal, self._armed_at = signame, time.monotonic()
        self._timer = threading.Timer(self.timeout_s, self.fire)
        self._timer.daemon = True
        self._timer.start()
        logger.info("%s: stopping (at most %.0f s, setting shutdown_timeout_s)", signame,
                    self.timeout_s)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def fire(self) -> None:
        pending = ""
        if self.describe is not None:
            try:
                pending = self.describe()
            except Exception as exc:  # noqa: BLE001 - diagnostics only
                pending = f"(could not tell: {exc!r})"
        logger.error(
            "worker did not stop within %.0f s of %s (setting shutdown_timeout_s); last step: "
            "%r%s. Exiting now (status %d): offsets are committed only for plays whose "
            "changelog records reached Kafka, so the rest are applied again on restart, as "
            "after a crash", self.timeout_s, self._signal, self.step.last,
            f"; pending: {pending}" if pending else "", EXIT_STOP_TIMEOUT)
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):  # exiting anyway
                handler.flush()
        sys.stderr.flush()
        self._exit(EXIT_STOP_TIMEOUT)


async def bounded_flush(flush: Awaitable[None], timeout_s: float) -> None:
    """Await Faust's producer ``flush`` for at most ``timeout_s`` (logged when it gives up).
    :meth:`stream.faustx.app.SeamApp._producer_flush` calls it around Faust's own."""
    try:
        await asyncio.wait_for(flush, timeout_s)
    except TimeoutError:
        logger.warning(
            "stop: the producer could not deliver its buffered records within %.1f s "
            "(broker unreachable?); giving up on them. Their plays' offsets were not "
            "committed, so they are applied again on restart", timeout_s)


def pending_changelog(app: Any) -> str:
    """What the app's batched changelog tables still hold (for the deadline's log)."""
    from stream.faustx.changelog_table import BatchedChangelogTable

    parts = []
    for table in app.tables.values():
        if isinstance(table, BatchedChangelogTable):
            unacked = sum(not f.done() for f in table.handed_over())
            parts.append(f"{table.name}: {unacked} changelog record(s) not acknowledged, "
                         f"{table.dirty} not sent")
    return "; ".join(parts)


class SeamWorker(faust.Worker):
    """The worker class of the seam's apps (Faust's ``App(Worker=...)`` setting: run it as
    ``app.conf.Worker(app, ...)``). The first stop signal arms a :class:`ShutdownDeadline`
    of the app's ``SeamOptions.stop_timeout_s`` (none: Faust's unbounded stop); its log says
    what the app's batched changelog tables still hold."""

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(app, *args, **kwargs)
        timeout_s = seam_options(app).stop_timeout_s
        self.stop_deadline: ShutdownDeadline | None = None
        if timeout_s is not None:
            self.stop_deadline = ShutdownDeadline(timeout_s, lambda: pending_changelog(app))

    def _setproctitle(self, info: str, *, ident: str = "") -> None:
        # faust.Worker retitles the process ("[Faust:Worker] -init- ...") when the optional
        # setproctitle package is installed (faust-streaming[fast] brings it): that would
        # erase the command line `stream stack` finds its detached worker by (PID file plus
        # marker), so `stream demo` would take it for gone and `stack down` would not stop
        # it. The title stays the command line; pinned in compat.
        del info, ident

    def _schedule_shutdown(self, signal: Signals) -> None:
        # mode.Worker: both signal handlers (SIGINT, SIGTERM) call it; pinned in compat
        if self.stop_deadline is not None:
            self.stop_deadline.arm(getattr(signal, "name", str(signal)))
        super()._schedule_shutdown(signal)
