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
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stream.worker.fencing import FreezeFence

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


class TurnBudget:
    """The loop's own work (CPU of its thread) since the lag probe's last wake-up, shared by
    the parts that take large steps on the loop: the plays agent's batch, the ranker's pass
    and what a pass hands on (the signals publisher's flush). Each part awaits :meth:`room`
    before its step; once the turn has spent ``budget_s``, the step waits for the probe's
    next wake-up (:meth:`beat`: a new turn), and the parts that waited go on in the order
    they came, each only if the turn still has room. Every part was bounded on its own, but
    under an overload all were ready at once and one turn ran them back to back (a batch of
    64 plays, a ranking pass, a flush of 1,000 signed signals: 50-72 ms of the loop's own
    work in session 13's junk-ids drill). Only the slicing changes: each step is the same.
    Without a running probe (:attr:`active` false) nothing waits."""

    def __init__(self, budget_s: float = 0.02) -> None:
        if budget_s <= 0:
            raise ValueError(f"budget_s must be > 0, got {budget_s!r}")
        self.budget_s = budget_s
        self.turn_cpu = time.thread_time()
        #: set by the probe while it runs: only then does a new turn come
        self.active = False
        #: how many times a step waited for a new turn (tests, the curious)
        self.waits = 0
        self._next: asyncio.Future[None] | None = None

    def beat(self, cpu: float | None = None) -> None:
        """A new turn starts (the probe ran; ``cpu``: its thread's CPU time now)."""
        self.turn_cpu = time.thread_time() if cpu is None else cpu
        self._release()

    def stop(self) -> None:
        """The probe stopped: nothing waits for a turn any more."""
        self.active = False
        self._release()

    def _release(self) -> None:
        nxt, self._next = self._next, None
        if nxt is not None and not nxt.done():
            nxt.set_result(None)

    def spent(self) -> float:
        return time.thread_time() - self.turn_cpu

    async def room(self) -> None:
        """Return at once while the turn has room; otherwise wait for a turn with room."""
        while self.active and time.thread_time() - self.turn_cpu >= self.budget_s:
            self.waits += 1
            if self._next is None:
                self._next = asyncio.get_running_loop().create_future()
            # shielded: a cancelled waiter must not cancel the others' turn
            await asyncio.shield(self._next)


class LoopLagProbe:
    """Measures how long the event loop is held: a task that sleeps ``interval_s`` at a time
    and reports each wake-up's lateness (``on_lag(seconds)``), keeping the largest in
    :attr:`max_lag`. A callback that holds the loop for T shows as a lateness between
    T - ``interval_s`` and T. Run :meth:`run` as a task of the loop to watch."""

    def __init__(self, on_lag: Callable[[float], None], interval_s: float = 0.01,
                 sampler: StallSampler | None = None,
                 on_busy: Callable[[float], None] | None = None,
                 fence: FreezeFence | None = None,
                 turns: TurnBudget | None = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.on_lag = on_lag
        #: told, at every wake-up, the CPU time the loop's thread used since the previous
        #: one (``time.thread_time``): the part of a lag that is the worker's own work on
        #: the loop. The rest of a lag is time the thread was not running (the machine's
        #: other processes, or another thread of the worker holding the GIL).
        self.on_busy = on_busy
        self.max_busy = 0.0
        #: told of every wake-up before anything else (it ends the process after a freeze
        #: past the session), disarmed when the probe stops
        self.fence = fence
        #: the parts' shared budget per loop turn: a new turn at every wake-up, if set
        if turns is not None and turns.budget_s < interval_s:
            # a spent budget must mean the probe's timer is already due (the thread's CPU
            # cannot outrun the clock); a smaller one idles the loop while parts wait
            raise ValueError(f"the turn budget ({turns.budget_s} s) must be at least the "
                             f"probe's interval ({interval_s} s)")
        self.turns = turns
        #: told of every wake-up (its heartbeat), if set
        self.sampler = sampler
        self.interval_s = interval_s
        self.max_lag = 0.0
        self.samples = 0

    def observe(self, lag: float) -> None:
        lag = max(0.0, lag)
        self.samples += 1
        if lag > self.max_lag:
            self.max_lag = lag
        self.on_lag(lag)

    def observe_busy(self, cpu_s: float) -> None:
        cpu_s = max(0.0, cpu_s)
        if cpu_s > self.max_busy:
            self.max_busy = cpu_s
        if self.on_busy is not None:
            self.on_busy(cpu_s)

    async def run(self) -> None:
        import time

        loop = asyncio.get_running_loop()
        interval = self.interval_s
        sampler = self.sampler
        fence = self.fence
        turns = self.turns
        if sampler is not None:
            sampler.start()
        cpu = time.thread_time()
        if turns is not None:
            turns.active = True
            turns.beat(cpu)
        try:
            while True:
                due = loop.time() + interval
                await asyncio.sleep(interval)
                if fence is not None:
                    fence.beat(_monotonic())
                if sampler is not None:
                    sampler.beat()
                self.observe(loop.time() - due)
                now_cpu = time.thread_time()
                if turns is not None:
                    turns.beat(now_cpu)
                self.observe_busy(now_cpu - cpu)
                cpu = now_cpu
        finally:
            if turns is not None:
                turns.stop()
            if fence is not None:
                fence.disarm()
            if sampler is not None:
                sampler.stop()


class StallSampler:
    """Says *where* the event loop is held: a daemon thread that, while the loop's
    heartbeat (:meth:`beat`, called by :class:`LoopLagProbe`'s task) is older than
    ``threshold_s``, samples the loop thread's Python stack every ``interval_s``, and when
    the episode ends logs (WARNING, at most one line per ``min_gap_s``, but every episode
    with ``always_cpu_s`` or more of the loop's own CPU) its length and the stack seen most
    often, innermost ``depth`` frames. Off unless the worker's
    ``stall_sample_ms`` is set: a diagnostic for drills (the junk-ids drill found its loop
    stalls with it), costing one wake-up of a thread per ``interval_s``."""

    def __init__(self, threshold_s: float, interval_s: float = 0.005, depth: int = 14,
                 min_gap_s: float = 1.0, log: logging.Logger | None = None,
                 always_cpu_s: float = 0.05) -> None:
        import threading

        if threshold_s <= 0:
            raise ValueError(f"threshold_s must be > 0, got {threshold_s!r}")
        self.threshold_s = threshold_s
        self.interval_s = interval_s
        self.depth = depth
        self.min_gap_s = min_gap_s
        #: episodes with this much of the loop's own CPU are logged even within min_gap_s
        #: (the 1M junk drill of session 16 had a 79 ms turn that no line named)
        self.always_cpu_s = always_cpu_s
        self.log = log or logger
        self.loop_thread = threading.get_ident()
        self.last_beat = _monotonic()
        #: the loop thread's CPU time (``time.thread_time``) at its last heartbeat: an
        #: episode's CPU is the loop's own work in it, the rest is the thread not running
        self.last_beat_cpu = 0.0
        #: (seconds, most frequent stack) of the episodes seen, longest first, at most 20
        self.episodes: list[tuple[float, str]] = []
        #: (seconds, loop-thread CPU seconds) of the last episode
        self.last_episode: tuple[float, float] | None = None
        self._halt = threading.Event()
        self._sampling = threading.Thread(target=self._sample_loop, name="stall-sampler",
                                          daemon=True)

    def beat(self) -> None:
        import time

        self.last_beat_cpu = time.thread_time()
        self.last_beat = _monotonic()

    def start(self) -> None:
        import threading

        self.loop_thread = threading.get_ident()
        self.beat()
        self._sampling.start()

    def stop(self) -> None:
        self._halt.set()

    def _loop_stack(self) -> str | None:
        import sys
        import traceback

        frame = sys._current_frames().get(self.loop_thread)
        if frame is None:
            return None
        summary = traceback.extract_stack(frame)[-self.depth:]
        return " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}"
                           for f in reversed(summary))

    def _sample_loop(self) -> None:
        from collections import Counter

        stacks: Counter[str] = Counter()
        started: float | None = None
        started_cpu = 0.0
        last_log = -math.inf  # monotonic counts from boot: a young VM's first episode too
        while not self._halt.wait(self.interval_s):
            now = _monotonic()
            held = now - self.last_beat
            if held >= self.threshold_s:
                if started is None:
                    started, started_cpu = self.last_beat, self.last_beat_cpu
                stack = self._loop_stack()
                if stack:
                    stacks[stack] += 1
                continue
            if started is None:
                continue
            seconds = self.last_beat - started
            cpu = max(0.0, self.last_beat_cpu - started_cpu)
            self.last_episode = (seconds, cpu)
            top, hits = stacks.most_common(1)[0] if stacks else ("?", 0)
            total = sum(stacks.values())
            self.episodes.append((seconds, top))
            self.episodes.sort(key=lambda e: -e[0])
            del self.episodes[20:]
            if now - last_log >= self.min_gap_s or cpu >= self.always_cpu_s:
                last_log = now
                self.log.warning("event loop held %.0f ms (%.0f ms of it the loop's own CPU "
                                 "work); %d/%d samples in: %s",
                                 seconds * 1000, cpu * 1000, hits, total, top)
            stacks.clear()
            started = None


def _monotonic() -> float:
    import time

    return time.monotonic()
