"""Faust's aiokafka consumer, adapted for the worker: :class:`SeamConsumer`.

The app gets it through the seam's transport (:mod:`stream.faustx.transport`, broker URL
scheme ``faustx://``), Faust's own extension point for consumer classes. It changes four
things, each configured by :class:`stream.faustx.options.SeamOptions`:

- **On the event loop** (``in_loop``, setting ``kafka_consumer_thread=false``):
  faust-streaming runs its aiokafka consumer in a separate thread with its own event loop
  (``AIOKafkaConsumerThread``, a ``mode.ServiceThread``) and asks it for every batch through
  a method queue: each ``getmany`` costs a ``call_soon_threadsafe`` each way (a self-pipe
  write and a wake-up of the other loop), the thread loop's own turns, and two hand-overs of
  the GIL between two busy threads. The thread exists so heartbeats and fetches keep going
  while an agent blocks the main loop; this worker's agent never blocks for long (its
  longest step is the fork of a checkpoint's snapshot child, ~10 ms, against a session
  timeout of 10 s), and in a live stream the thread was a cost on every batch
  (docs/benchmarks.md, session 8). :class:`InLoopConsumerThread` is the same service started
  as a task on the app's loop: ``call_thread`` awaits the call directly, the service is
  started and stopped as Faust's thread would start and stop it (the same ``_serve``: start,
  run until stopped, shut down), and nothing else changes (rebalance callbacks still go
  through the consumer's method queue, now on one loop).
- **Fetch wait** (``fetch_max_wait_ms``): Faust hard-codes aiokafka's ``fetch_max_wait_ms``
  to 1,500 ms. Fed live at 700-1,000 events/s, the worker now and then received nothing for
  ~1.5 s although records kept arriving, and at that load it never caught up again (P2 runs:
  the processed rate fell to ~200/s for about 1.5 s, with no event-loop block or slow commit
  logged). With 100 ms the stalls were gone in every run (docs/benchmarks.md, session 6).
  Which fetch the broker held, and why, is not pinned down. The price is at most 10 empty
  fetches a second per idle consumer.
- **Direct hand-over** (``fast_delivery``): the fetch loop awaits the conductor's callback
  directly when nothing it could block on is in the way (:mod:`stream.faustx.delivery`).
- **Resume after seek** (``hold_topics``): faust-streaming 0.15 resumes a rebalanced
  partition *before* awaiting the seek to its committed offset. In the gap, aiokafka's fetch
  position can be ahead of the committed offset (Faust's ``getmany`` discards the rest of a
  fetched batch when flow stops, after aiokafka's position moved past it), so the restarted
  worker applied offsets 183-188 of a partition, the seek then rewound it to 34, and the
  per-listener offset guard dropped 34-182 as replays (the crash-loop loss,
  docs/reliability.md). The partitions of ``hold_topics`` are resumed once the seek has run
  *and* Faust has resumed flow (which clears its stream buffers: Faust always calls
  ``app.flow_control.resume()`` right before ``consumer.resume_flow()``), so every record the
  stream sees comes from a position the seek set: Faust pauses partitions in its own fetch
  filter, so nothing fetched before can pass, and aiokafka's seek drops what it had
  buffered.
- **Reading a partition again** (:meth:`SeamConsumer.read_again`, for the plays agent's
  offset fence): a seek alone leaves three things behind that Faust's fetch loop would still
  act on: records of the partition in a batch fetched before the seek (delivered after it,
  past the seek offset), the gaps the loop recorded at or after the seek offset (which
  Faust's ``_new_offset`` adds to the acked offsets, so a commit could pass records the
  reread has not applied yet), and records already in the stream's buffer. The consumer
  numbers its rereads, the fetch loop (:mod:`stream.faustx.delivery`) drops a partition's
  records from a batch collected before that partition's last reread, the gaps from the seek
  offset on are cut, and the first record fetched after the seek is remembered
  (:meth:`SeamConsumer.first_after_reread`) so the agent can tell what was buffered before
  the seek from what was read again.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Iterable
from typing import Any

from faust.exceptions import ConsumerNotStarted
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.types import TP
from mode import Service
from mode.utils.futures import maybe_async

from stream.faustx.delivery import drain_messages
from stream.faustx.options import seam_options

logger = logging.getLogger(__name__)


class FetchWaitConsumerThread(AIOKafkaConsumerThread):
    """Faust's consumer thread whose aiokafka consumer asks the broker to hold an empty
    fetch at most ``SeamOptions.fetch_max_wait_ms``."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        options = seam_options(self.app)
        if options.fetch_max_wait_ms is not None:
            # Faust passes fetch_max_wait_ms=1500 with no setting for it, and aiokafka reads
            # these two attributes only in start() (compat pins both sources)
            consumer._fetch_max_wait_ms = options.fetch_max_wait_ms
            consumer._fetch_min_bytes = options.fetch_min_bytes
        return consumer


class InLoopConsumerThread(FetchWaitConsumerThread):
    """The consumer "thread" served on the parent loop (no thread)."""

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


class SeamConsumer(AIOKafkaConsumer):
    """Faust's aiokafka consumer with the adaptations of the module doc."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        #: partitions of the hold topics Faust asked to resume, held until the seek ran
        self.held_partitions: set[TP] = set()
        self.sought = False
        #: where each hold-topic partition's stream starts after the last seek: the
        #: committed offset, or the partition's earliest offset when the group has none
        #: (None if that could not be read); the plays agent's OffsetFence checks against it
        self.start_offsets: dict[TP, int | None] = {}
        #: how many seeks to committed offsets ran (the fence resets when it changes)
        self.seek_epoch = 0
        #: rereads so far (read_again); the fetch loop compares it with the count when it
        #: collected a batch
        self.reread_count = 0
        #: partition -> (its reread's number, offset) until the first record fetched after
        #: that seek is delivered
        self.rereads: dict[TP, tuple[int, int]] = {}
        #: partition -> the first message delivered after its last reread's seek
        self._first_after_reread: dict[TP, Any] = {}
        super().__init__(*args, **kwargs)
        options = seam_options(self.app)
        self.hold_topics = options.hold_topics
        self.fast_delivery = options.fast_delivery
        #: on the app's loop a batch is collected right before its first message is yielded
        #: (no await in between): a seek counted by then came before the collection
        self.exact_batches = options.in_loop

    async def _drain_messages(self, fetcher: Any) -> None:
        # Faust's fetch loop (the Fetcher service awaits it), copied: it also drops what a
        # reread left behind; ``fast_delivery`` only selects the direct hand-over in it
        await drain_messages(self, fetcher)

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        if seam_options(self.app).in_loop:
            return InLoopConsumerThread(self, loop=self.loop, beacon=self.beacon)
        return FetchWaitConsumerThread(self, loop=self.loop, beacon=self.beacon)

    # -- resume after seek ----------------------------------------------------------------

    def resume_partitions(self, tps: Iterable[TP]) -> None:
        tps = set(tps)
        held = {tp for tp in tps if tp.topic in self.hold_topics}
        self.held_partitions.update(held)
        if tps - held:
            super().resume_partitions(tps - held)

    def pause_partitions(self, tps: Iterable[TP]) -> None:
        tps = set(tps)
        self.held_partitions.difference_update(tps)
        super().pause_partitions(tps)

    async def perform_seek(self) -> None:
        try:
            await super().perform_seek()
            await self._record_start_offsets()
        except BaseException:
            self.release_held()  # a partition held forever would stall the stream
            raise
        self.sought = True

    async def _record_start_offsets(self) -> None:
        """Where the hold topics' partitions start now (see ``start_offsets``)."""
        try:
            assigned = self.assignment()
        except ConsumerNotStarted:  # only in tests: what the seek found
            assigned = set(self._committed_offset)
        tps = {tp for tp in assigned if tp.topic in self.hold_topics}
        starts: dict[TP, int | None] = {tp: self._committed_offset.get(tp) for tp in tps}
        missing = [tp for tp, offset in starts.items() if offset is None]
        if missing:
            try:
                earliest = await self.earliest_offsets(*missing)
            except Exception as exc:  # noqa: BLE001 - the fence then trusts the first record
                logger.warning("could not read the earliest offsets of %s (%r): the plays "
                               "agent cannot check where their streams start", missing, exc)
                earliest = {}
            for tp in missing:
                starts[tp] = earliest.get(tp)
        self.start_offsets = starts
        self.rereads.clear()  # every stream starts again at its committed offset
        self._first_after_reread.clear()
        self.seek_epoch += 1

    # -- reading a partition again ----------------------------------------------------------

    async def read_again(self, tp: TP, offset: int) -> None:
        """Seek ``tp`` back to ``offset`` so that its stream goes on, in order, from there
        (see the module doc): records fetched before the seek are not delivered, gaps from
        ``offset`` on are forgotten, and the next record delivered is marked as the first
        read again."""
        self.reread_count += 1
        self.rereads[tp] = (self.reread_count, offset)
        self._first_after_reread.pop(tp, None)
        gaps = self._gap.get(tp)
        if gaps:
            gaps.chop(offset, sys.maxsize)
        await self.seek(tp, offset)  # Faust's: aiokafka drops its buffer, read offset reset

    def first_after_reread(self, tp: TP) -> Any:
        """The first message of ``tp`` delivered after its last reread (None: none yet)."""
        return self._first_after_reread.get(tp)

    def fetched_before_reread(
        self, tp: TP, message: Any, fetch_no: int, first_no: int
    ) -> bool | None:
        """For the fetch loop, about a message of a partition being read again: True if it
        was fetched before the reread's seek (drop it), False if it is the first one read
        again (deliver it), None if that cannot be told (seek again)."""
        seek_no, _offset = self.rereads[tp]
        if seek_no > first_no:
            return True  # sought after this batch was collected
        if seek_no > fetch_no and not self.exact_batches:
            # sought while another thread fetched this batch: collected before or after?
            return None
        del self.rereads[tp]
        self._first_after_reread[tp] = message
        return False

    def resume_flow(self) -> None:
        super().resume_flow()  # Faust has just resumed app.flow_control (buffers cleared)
        if self.sought:
            self.release_held()  # only now: nothing fetched after the seek can be cleared

    def release_held(self) -> None:
        """Resume the held partitions (after the seek, or when the seek failed)."""
        self.sought = False
        if self.held_partitions:
            tps = set(self.held_partitions)
            self.held_partitions.clear()
            super().resume_partitions(tps)

    # -- state for the stall watch ----------------------------------------------------------

    def paused_partitions(self) -> set[TP]:
        """The partitions Faust's fetch filter holds back now."""
        return set(self._paused_partitions)

    def hold_state(self) -> dict[str, Any]:
        """The resume-after-seek state (for the stall watch): partitions held, seek done."""
        return {"held": sorted(str(tp) for tp in self.held_partitions), "sought": self.sought}

    @property
    def committing(self) -> bool:
        """Whether a commit is in progress."""
        return self._commit_fut is not None
