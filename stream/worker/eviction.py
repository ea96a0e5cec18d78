"""The catalogue eviction, run in slices between the event loop's other work, and the guard
that keeps every other user of the models away while it runs.

At the 500k-track cap an eviction takes ~0.2-0.9 s of CPU: compiled passes over the
co-occurrence arenas that release the GIL, and numpy and dictionary work that holds it. It
used to run whole in a thread beside the loop, and the loop waited for the GIL whenever the
machine descheduled that thread while it held it (610 ms of lag for 38 ms of the loop's own
work at load ~21: docs/benchmarks.md, "Eviction at the track cap"). Now the GIL-holding
work runs on the loop itself, in slices (``Processor.eviction_steps``: each about a
millisecond or less) of at most :data:`EVICTION_SLICE_S` per loop turn, and only the
compiled passes run in a thread, where they hold no GIL. While it runs, nothing on the
event loop touches the models: the plays agent awaits it, and the ranker, the "more like
this" refresh, the signal reader, the checkpointer and the memory gauge wait
(:meth:`ModelGuard.free`) or skip their turn (:meth:`ModelGuard.busy`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Final

from stream.core.models._vocab import EvictionSteps, drain
from stream.processing.pipeline import Processor
from stream.worker.telemetry import Telemetry

logger = logging.getLogger(__name__)

#: most seconds of eviction slices run in one turn of the event loop
EVICTION_SLICE_S: Final = 0.004


async def run_steps(steps: EvictionSteps[object], slice_s: float = EVICTION_SLICE_S) -> None:
    """Run ``steps``: their slices on this event loop, for about ``slice_s`` per loop turn
    (then other work runs), and their compiled GIL-free passes in a thread. Cancelled in
    the middle, it finishes the eviction here and now before it lets the cancellation
    through (a compiled pass under way first): the models must never stay half-changed."""
    turn = time.perf_counter()
    running: concurrent.futures.Future[object] | None = None
    current: Callable[[], object] | None = None
    try:
        for step in steps:
            if step is not None:
                current, running = step, _executor().submit(step)
                # shielded: a cancellation must not cancel the thread's future (a pass
                # still queued would then never run, and the rest of the steps neither)
                await asyncio.shield(asyncio.wrap_future(running))
                current = running = None
                turn = time.perf_counter()
            elif time.perf_counter() - turn >= slice_s:
                await asyncio.sleep(0)
                turn = time.perf_counter()
    except asyncio.CancelledError:
        if running is not None and current is not None:
            if running.cancel():  # not started yet: run it here instead
                current()
            else:
                running.result()  # under way (or done): wait for it
        drain(steps)
        raise


_EXECUTORS: list[concurrent.futures.ThreadPoolExecutor] = []


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    """The thread the eviction's compiled passes run in (one, made at first use)."""
    if not _EXECUTORS:
        _EXECUTORS.append(concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="eviction"))
    return _EXECUTORS[0]


class ModelGuard:
    """Runs the eviction the pipeline asks for (see the module docstring); says whether one
    is running."""

    def __init__(
        self, processor: Processor, telemetry: Telemetry, on_evicted: Callable[[], None]
    ) -> None:
        self.processor = processor
        self.telemetry = telemetry
        #: called once an eviction has finished (the ranker: listeners may wait)
        self.on_evicted = on_evicted
        self._running: asyncio.Future[None] | None = None

    def busy(self) -> bool:
        return self._running is not None

    async def free(self, warn_after_s: float = 30.0) -> None:
        """Wait for a running eviction to finish. Not bounded: its callers (a checkpoint,
        replicated signals, the stop) must never see half-evicted models, and an eviction
        always ends (its steps are finite; the worker's stop deadline bounds a stop). A
        wait past ``warn_after_s`` is logged, once per ``warn_after_s``."""
        warn_at = time.monotonic() + warn_after_s
        while self.busy():
            await asyncio.sleep(0.005)
            if time.monotonic() >= warn_at:
                logger.warning("still waiting for the catalogue eviction to finish")
                warn_at += warn_after_s

    async def evict_due(self) -> None:
        """Run the eviction the last batch asked for (a catalogue above max_tracks), in
        slices (see the module docstring). If this task is cancelled (a stop), the
        eviction still finishes (the models must not stay half-changed), and :meth:`busy`
        stays true until it has."""
        loop = asyncio.get_running_loop()
        fut = loop.create_task(run_steps(self.processor.eviction_steps()))
        self._running = fut
        fut.add_done_callback(self._finished)
        with contextlib.suppress(Exception):  # reported by _finished
            await asyncio.shield(fut)

    def _finished(self, fut: asyncio.Future[None]) -> None:
        self._running = None
        processor = self.processor
        exc = None if fut.cancelled() else fut.exception()
        if isinstance(exc, Exception):
            self.telemetry.model_error()
            processor.report_model_error(exc, None)
        self.telemetry.evictions_took(processor.eviction_seconds)
        processor.eviction_seconds.clear()
        if processor.rank_waiting():
            self.on_evicted()
