"""The freeze fence: a worker whose event loop was frozen for most of its Kafka session
assumes it was fenced, and exits at once without flushing.

Why: a worker stopped past its session (a VM pause, SIGSTOP, a swap storm, a loop blocked
by a long call) has been removed from the consumer group and its partitions given to
another worker, but it only learns that from the next heartbeat's answer. Until then the
consumer generation it sees is still the old one, so nothing can tell its buffered plays
are stale: it applies them as a zombie, its producer sends their session changelog records
*after* the new owner's, and when it gets the partitions back Faust counts them as kept
(no changelog recovery) and it goes on from its state of before the stall, behind Redis
(docs/reliability.md, "A worker stalled past its session"). Exiting is the one response
that is right whatever happened meanwhile: a restarted worker recovers every partition it
gets from the changelog (which keeps the newer of two records of a listener,
:class:`stream.faustx.changelog_table.BatchedChangelogTable`), and the Redis seq guard
refuses anything older. Resuming would need Faust to re-recover partitions it thinks it
kept and to forget its buffered plays, neither of which it offers.

How: :class:`FreezeFence` records the time of each tick of the loop-lag probe (every
10 ms, :class:`stream.worker.watchdog.LoopLagProbe`); the probe's next tick, the plays
agent before it applies a batch, and a SIGCONT handler (which runs before any callback of
the resumed loop) each check the time since the last tick. A gap above
``FENCE_FRACTION`` of ``kafka_session_timeout_s``, while the worker holds partitions,
logs one ERROR line and ends the process with :data:`EXIT_FENCED` through ``os._exit``:
no producer flush, no commit, no shutdown, so neither the buffered plays nor changelog
records still in the producer's buffer of the old generation get out. The process
supervisor must restart it (docker-compose: ``restart: unless-stopped``).

Why half the session: the worker heartbeats every ``min(2 s, session / 3)``, so the
coordinator may expire it after a silence of ``session - session / 3``; half leaves room
for the heartbeat's round trip and timer slack. A gap below it cannot have cost the
membership.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, Final

logger = logging.getLogger(__name__)

#: the worker's exit code when it fenced itself after a freeze (EX_TEMPFAIL: restart it)
EXIT_FENCED: Final = 75
#: a loop frozen longer than this fraction of the session timeout may have been fenced
FENCE_FRACTION: Final = 0.5


def exit_fenced(gap_s: float, limit_s: float, session_timeout_s: float) -> None:
    """Log why and end the process at once with :data:`EXIT_FENCED` (no flush, no
    shutdown: see the module docstring)."""
    logger.error(
        "event loop frozen for %.1f s (limit %.1f s: %.0f %% of kafka_session_timeout_s=%g): "
        "this worker was likely removed from its consumer group; exiting with code %d "
        "without flushing its producer (restart it: changelog recovery and the Redis seq "
        "guard restore its listeners)",
        gap_s, limit_s, FENCE_FRACTION * 100, session_timeout_s, EXIT_FENCED,
    )
    for handler in logging.getLogger().handlers + logger.handlers:
        with contextlib.suppress(Exception):  # exiting anyway
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os._exit(EXIT_FENCED)


class FreezeFence:
    """The decision (pure but for ``on_fenced``): :meth:`beat` on every probe tick,
    :meth:`check` anywhere else; both call ``on_fenced(gap_s)`` when the time since the
    previous tick exceeds :attr:`limit_s` while ``holds_partitions()`` says the worker is a
    group member with partitions. Unarmed (no check fires) until the first beat and after
    :meth:`disarm` (the probe stopped: a graceful shutdown must not trip it)."""

    def __init__(
        self,
        session_timeout_s: float,
        holds_partitions: Callable[[], bool],
        on_fenced: Callable[[float], None] | None = None,
        fraction: float = FENCE_FRACTION,
    ) -> None:
        if session_timeout_s <= 0:
            raise ValueError(f"session_timeout_s must be > 0, got {session_timeout_s!r}")
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
        self.session_timeout_s = session_timeout_s
        self.limit_s = session_timeout_s * fraction
        self.holds_partitions = holds_partitions
        self.on_fenced = on_fenced or (
            lambda gap: exit_fenced(gap, self.limit_s, self.session_timeout_s))
        self.last_tick: float | None = None

    def gap(self, now: float) -> float | None:
        """The time since the last tick if it exceeds the limit and the worker holds
        partitions, else None."""
        last = self.last_tick
        if last is None or now - last <= self.limit_s:
            return None
        if not self.holds_partitions():
            return None
        return now - last

    def check(self, now: float) -> bool:
        """Whether the loop was frozen past the limit (``on_fenced`` was called)."""
        gap = self.gap(now)
        if gap is None:
            return False
        self.on_fenced(gap)
        return True

    def beat(self, now: float) -> bool:
        """A tick of the probe: check, then record ``now`` as the last tick."""
        fenced = self.check(now)
        self.last_tick = now
        return fenced

    def disarm(self) -> None:
        self.last_tick = None

    def install_sigcont(self, clock: Callable[[], float]) -> None:
        """Check on SIGCONT (the end of a job-control stop): Python runs the handler as soon
        as the main thread resumes, before any callback of the event loop (the producer's
        sender among them). Call from the main thread."""

        def on_sigcont(signum: int, frame: Any) -> None:
            self.check(clock())

        signal.signal(signal.SIGCONT, on_sigcont)
