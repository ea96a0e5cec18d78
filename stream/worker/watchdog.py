"""Stall detection: notice a worker that has work waiting but applies nothing, and say where
it is stuck.

Faust's own detectors ("Stream has not started processing ...") fire after
``stream_processing_timeout`` (300 s) and do not show the asyncio tasks. This watch fires
after ``after_s`` of no progress while the consumer reports lag, logs once per episode with
every asyncio task's innermost frames plus whatever state the caller describes, and counts
the episode -- so an operator (or a failing reliability drill) sees *which await* holds the
stream instead of a silent worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


def _await_chain(coro: Any) -> list[Any]:
    """The frames of a coroutine and of everything it is awaiting, outermost first
    (``Task.get_stack`` shows only the task's own coroutine frame)."""
    frames = []
    seen = 0
    while coro is not None and seen < 100:
        seen += 1
        frame = (
            getattr(coro, "cr_frame", None)
            or getattr(coro, "gi_frame", None)
            or getattr(coro, "ag_frame", None)
        )
        if frame is not None:
            frames.append(frame)
        coro = (
            getattr(coro, "cr_await", None)
            or getattr(coro, "gi_yieldfrom", None)
            or getattr(coro, "ag_await", None)
        )
    return frames


def describe_tasks(limit: int = 6, max_tasks: int = 200) -> str:
    """One block per asyncio task of the running loop: its name, coroutine and the
    innermost ``limit`` frames of its await chain (file:line function), tasks sorted by
    name for a stable read."""
    lines: list[str] = []
    try:
        tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    except RuntimeError:  # called outside the event loop
        return "(no running event loop)"
    for task in tasks[:max_tasks]:
        coro = task.get_coro()
        name = getattr(coro, "__qualname__", repr(coro))
        lines.append(f"task {task.get_name()} {name}{' (done)' if task.done() else ''}")
        for frame in _await_chain(coro)[-limit:]:
            code = frame.f_code
            lines.append(f"    {code.co_filename}:{frame.f_lineno} {code.co_name}")
    if len(tasks) > max_tasks:
        lines.append(f"... {len(tasks) - max_tasks} more tasks")
    return "\n".join(lines)


@dataclass
class StallWatch:
    """Call :meth:`progress` for every event applied and :meth:`check` periodically with the
    current lag; ``check`` returns True (and logs once) when a stall episode begins."""

    after_s: float = 15.0
    describe_state: Callable[[], dict[str, Any]] = field(default=dict)
    last_progress: float | None = None
    stalled: bool = False
    episodes: int = 0

    def __post_init__(self) -> None:
        if self.after_s <= 0:
            raise ValueError(f"after_s must be > 0, got {self.after_s!r}")

    def progress(self, now: float) -> None:
        self.last_progress = now
        if self.stalled:
            self.stalled = False
            logger.warning("stream resumed after a stall")

    def check(self, now: float, lag: int) -> bool:
        if lag <= 0 or self.last_progress is None:
            # nothing waiting: idle is not stalled (and the first check starts the clock)
            self.last_progress = now
            self.stalled = False
            return False
        idle = now - self.last_progress
        if self.stalled or idle < self.after_s:
            return False
        self.stalled = True
        self.episodes += 1
        try:
            state = self.describe_state()
        except Exception as exc:  # noqa: BLE001 - diagnostics must never take the worker down
            state = {"describe_state_error": repr(exc)}
        logger.warning(
            "stream stalled: %d message(s) waiting, none applied for %.0f s; state: %r\n%s",
            lag, idle, state, describe_tasks(),
        )
        return True


class LoopLagProbe:
    """Measures how long the event loop is held: a task that sleeps ``interval_s`` at a time
    and reports each wake-up's lateness (``on_lag(seconds)``), keeping the largest in
    :attr:`max_lag`. A callback that holds the loop for T shows as a lateness between
    T - ``interval_s`` and T. Run :meth:`run` as a task of the loop to watch."""

    def __init__(self, on_lag: Callable[[float], None], interval_s: float = 0.01) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.on_lag = on_lag
        self.interval_s = interval_s
        self.max_lag = 0.0
        self.samples = 0

    def observe(self, lag: float) -> None:
        lag = max(0.0, lag)
        self.samples += 1
        if lag > self.max_lag:
            self.max_lag = lag
        self.on_lag(lag)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.interval_s
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            self.observe(loop.time() - due)
