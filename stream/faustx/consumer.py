"""Faust's aiokafka consumer, run on the worker's own event loop instead of a thread.

faust-streaming runs its aiokafka consumer in a separate thread with its own event loop
(``AIOKafkaConsumerThread``, a ``mode.ServiceThread``) and asks it for every batch through a
method queue: each ``getmany`` costs a ``call_soon_threadsafe`` each way (a self-pipe write
and a wake-up of the other loop), the thread loop's own turns, and two hand-overs of the GIL
between two busy threads. The thread exists so heartbeats and fetches keep going while an
agent blocks the main loop; this worker's agent never blocks for long (its longest step is
the fork of a checkpoint's snapshot child, ~10 ms, stream.worker.snapshot, against a session
timeout of 10 s), and in a live
stream the thread was a cost on every batch (docs/benchmarks.md, session 8).

:class:`InLoopConsumer` is Faust's aiokafka ``Consumer`` whose consumer "thread" is the same
service started as a task on the app's loop: ``call_thread`` awaits the call directly, the
service is started and stopped as Faust's thread would start and stop it (the same
``_serve``: start, run until stopped, shut down), and nothing else changes (rebalance
callbacks still go through the consumer's method queue, now on one loop).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from mode import Service
from mode.utils.futures import maybe_async

logger = logging.getLogger(__name__)


class InLoopConsumerThread(AIOKafkaConsumerThread):
    """``AIOKafkaConsumerThread`` served on the parent loop (no thread)."""

    _serve_task: asyncio.Task[None] | None = None

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        loop = kwargs.pop("loop", None) or asyncio.get_event_loop_policy().get_event_loop()
        super().__init__(consumer, loop=loop, thread_loop=loop, **kwargs)

    async def start(self) -> None:
        # ServiceThread.start, with a task where it starts a thread (and without the
        # keep-alive that pokes the other loop once a second)
        assert not self._thread_started.is_set()
        self._thread_started.set()
        self._thread_running = asyncio.Future(loop=self.parent_loop)
        self._serve_task = self.parent_loop.create_task(
            self._serve(), name=f"in-loop {type(self).__name__}"
        )
        # a crash is reported by start() (through _thread_running) and by Faust's crash
        # handling; the task's own copy of the exception is read here so asyncio does not
        # log it again as "never retrieved"
        self._serve_task.add_done_callback(_retrieve)
        try:
            if not self.should_stop and self.wait_for_thread:
                await self._thread_running
        finally:
            self._thread_running = None

    async def stop(self) -> None:
        if self._started.is_set():
            await Service.stop(self)  # ServiceThread.stop without the thread join
            task, self._serve_task = self._serve_task, None
            if task is not None and not task.done():
                await asyncio.wait({task}, timeout=self.shutdown_timeout)

    async def _gather_remaining_tasks(self) -> None:
        # The thread's loop was its own: on exit it cancelled every task left on it. This
        # loop is the app's, and every other task on it belongs to someone else.
        return None

    async def call_thread(self, fun: Any, *args: Any, **kwargs: Any) -> Any:
        return await maybe_async(fun(*args, **kwargs))

    async def cast_thread(self, fun: Any, *args: Any, **kwargs: Any) -> None:
        await self.method_queue.cast(fun, *args, **kwargs)


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.debug("in-loop consumer service ended with %r", task.exception())


class InLoopConsumer(AIOKafkaConsumer):
    """Faust's aiokafka consumer with :class:`InLoopConsumerThread`."""

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return InLoopConsumerThread(self, loop=self.loop, beacon=self.beacon)


def consume_in_loop(app: faust.App) -> bool:
    """Make ``app`` create :class:`InLoopConsumer`; call before ``app.consumer`` is first
    used. ``False`` (and a warning) when the app's transport is not Faust's aiokafka one."""
    transport: Any = app.transport
    if not issubclass(transport.Consumer, AIOKafkaConsumer):
        logger.warning("the app's transport is not Faust's aiokafka one: consumer left as is")
        return False
    if getattr(app, "_consumer", None) is not None:
        logger.warning("the app's consumer exists already: consumer left as is")
        return False
    transport.Consumer = InLoopConsumer
    logger.info("Kafka consumer: on the worker's event loop (kafka_consumer_thread=false)")
    return True
