"""The plays agent: gathers plays from Faust's stream into batches, applies each batch
through the processing pipeline, hands the results on, then acks the plays.

One batch, step by step (:meth:`PlaysAgent.apply`):

0. the freeze fence (:mod:`stream.worker.fencing`): after an event-loop freeze past half
   the Kafka session the process exits here instead of applying plays that may belong to
   an ended generation;
1. ``_live`` -- drop plays of a stale consumer generation (a rebalance happened while they
   were buffered: the new owner reads them again), hold back plays that come after records
   the stream skipped (:class:`stream.processing.fence.OffsetFence`: their partition is read
   again from the first one missing) and turn the rest into pipeline records;
2. ``_pace`` -- tell the ranking pacing whether a backlog is being drained;
3. ``Processor.process_batch`` -- validate, session state, learn, queue the rankings;
4. ``_hand_on`` -- dead letters to their topic, the batch to telemetry, track signals;
5. ``_ack`` -- each play is acked once applied (its changelog record is dirty, and a commit
   sends it first), so its offset may be committed;
6. ``_after`` -- the session-table bound (``max_sessions``:
   :class:`stream.worker.sessions_bound.SessionBound`), an eviction the batch asked for,
   wake the ranker, send the session changelog, and give the other tasks a turn under a
   backlog.

Gathering (:meth:`PlaysAgent.run`): a lone play is applied at once; otherwise up to
``agent_batch`` plays go through each stage together (the stages stay in the CPU caches),
gathered for at most LIVE_GATHER_S, or ``agent_batch_ms`` when a backlog waits
(BACKLOG_PLAYS behind: freshness is queueing then). A batch is one step of the event loop,
so it also holds no more plays than the recent batches' cost per play says fit in
``agent_batch_budget_ms`` (:class:`stream.processing.pacing.BatchSizer`). The Faust side
of this -- taking buffered plays, manual acks, the wake-up value -- is the seam's
:class:`stream.faustx.stream.BatchingStream` (``App(Stream=...)``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

import faust

from stream.config import Settings
from stream.faustx.stream import BatchingStream
from stream.processing.fence import WAIT, OffsetFence
from stream.processing.pacing import CATCH_UP_PLAYS, BatchSizer, RankPacing
from stream.processing.pipeline import Outcome, Processor, Record, build_record
from stream.worker.deadletters import DeadLetters
from stream.worker.eviction import ModelGuard
from stream.worker.fencing import FreezeFence
from stream.worker.ranker import Ranker
from stream.worker.sessions_bound import SessionBound
from stream.worker.signals import SignalPublisher
from stream.worker.telemetry import Telemetry
from stream.worker.watchdog import StallWatch, TurnBudget

logger = logging.getLogger(__name__)

#: the agent hands the session changelog to the producer at least this often (seconds)
#: or once this many listeners are pending: a listener's plays within the window cost one
#: record, and a commit sends whatever is pending first anyway
CHANGELOG_SEND_S: Final = 0.02
CHANGELOG_BATCH: Final = 256
#: loop turns the agent yields, at most, for Faust's fetcher to hand over the next buffered
#: message (it takes two or three: a task per message and an asyncio.wait)
HANDOVER_TURNS: Final = 3
#: longest the agent gathers a batch when no backlog waits (a play's freshness pays for
#: it); once BACKLOG_PLAYS wait behind a play on its partition, up to ``agent_batch_ms``
LIVE_GATHER_S: Final = 0.002
BACKLOG_PLAYS: Final = 8
#: how often a held batch re-sends its wake-up (see PlaysAgent._wake)
WAKE_S: Final = 0.005
#: under a backlog, the agent yields to the other tasks (ranker, writer) this often
YIELD_S: Final = 0.004
#: the agent's wake-up value (never a Kafka record)
_WAKE: Any = object()


class PlaysAgent:
    """The ``process-plays`` agent (see the module docstring); :meth:`run` is the agent."""

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        processor: Processor,
        sessions: Any,
        *,
        pacing: RankPacing,
        ranker: Ranker,
        models: ModelGuard,
        dead_letters: DeadLetters,
        signals: SignalPublisher,
        telemetry: Telemetry,
        stall_watch: StallWatch,
        processed_offsets: dict[Any, int],
        sessions_bound: SessionBound | None = None,
        freeze_fence: FreezeFence | None = None,
        turns: TurnBudget | None = None,
    ) -> None:
        self.app = app
        self.processor = processor
        self.sessions = sessions
        self.pacing = pacing
        self.ranker = ranker
        self.models = models
        self.dead_letters = dead_letters
        self.signals = signals
        self.telemetry = telemetry
        self.stall_watch = stall_watch
        self.processed_offsets = processed_offsets
        #: ``max_sessions``: evicts the least recent listeners after each batch
        self.sessions_bound = sessions_bound
        #: ends the process before a batch is applied after a freeze past the session
        #: (:mod:`stream.worker.fencing`): its plays may belong to an ended generation
        self.freeze_fence = freeze_fence
        #: the loop turn's budget shared with the ranker: a batch starts in a turn with room
        self.turns = turns
        #: the most plays a batch gathers now: ``agent_batch``, or fewer once the recent
        #: batches' cost per play says more would not fit in ``agent_batch_budget_ms``
        self.sizer = BatchSizer(settings.agent_batch, settings.agent_batch_budget_ms / 1000.0)
        self.max_batch = self.sizer.limit
        self.backlog_wait = settings.agent_batch_ms / 1000.0
        self.live_wait = min(self.backlog_wait, LIVE_GATHER_S)
        self.stream: BatchingStream | None = None
        self.batch: list[Any] = []
        self._wake_handle: asyncio.TimerHandle | None = None
        self._yielded = self._changelog_sent = time.perf_counter()
        self._changelog_failures = 0
        #: plays are applied in offset order from where each partition was sought to
        self.fence = OffsetFence()
        #: partition -> the offset its last reread sought to (since the fence's last reset)
        self.sought: dict[Any, int] = {}
        self.skips_detected = 0

    def nothing_buffered(self) -> bool:
        """Whether no play waits in the stream buffer (True before the agent starts)."""
        return self.stream is None or self.stream.buffer_empty()

    def fetched_behind(self, msg: Any) -> int:
        """How many records this partition has after ``msg`` (the fetched highwater)."""
        try:
            highwater = self.app.consumer.highwater(msg.tp)
        except Exception:  # noqa: BLE001 - e.g. no longer assigned (a rebalance)
            return 0
        if highwater is None:
            return 0
        behind: int = highwater - msg.offset - 1
        return max(0, behind)

    # ------------------------------------------------------------------ gathering

    async def run(self, stream: faust.StreamT[bytes]) -> None:
        assert isinstance(stream, BatchingStream)  # App(Stream=BatchingStream)
        self.stream = stream
        # Acked once applied: a buffered play must not be committed before it is applied
        # (Faust acks an event when the iteration moves on to the next one).
        stream.manual_acks()
        batch = self.batch
        batch_started = 0.0
        try:
            async for value in stream:
                event = stream.current_event
                if event is None:  # a wake-up (or any value that is not a Kafka record)
                    if value is not _WAKE:
                        logger.warning("plays agent ignored a non-record value %r", value)
                    if batch:
                        await self.apply(self._release())
                    continue
                now = time.perf_counter()
                if not batch:
                    batch_started = now
                batch.append(event)
                stream.take_buffered(batch, self.max_batch)
                if await self._keep_gathering(stream, now - batch_started):
                    continue
                await self.apply(self._release())
        finally:
            if batch:  # the stream stopped with plays gathered: apply them (and ack)
                await self.apply(self._release())

    async def _keep_gathering(self, stream: BatchingStream, waited: float) -> bool:
        """Whether to wait for more plays before applying the batch: never waiting on the
        network, only for what Faust has already fetched."""
        if len(self.batch) >= self.max_batch:
            return False
        behind = self.fetched_behind(self.batch[-1].message)
        window = self.backlog_wait if behind >= BACKLOG_PLAYS else self.live_wait
        if waited >= window or not (behind or not stream.buffer_empty()):
            return False
        # a fetch response lands in the buffer at once (stream.faustx.delivery; Faust's
        # own loop hands over one message per few turns of the event loop): give the
        # fetcher a few turns before applying
        for _ in range(HANDOVER_TURNS):
            if not stream.buffer_empty():
                break
            await asyncio.sleep(0)
        if stream.buffer_empty():
            return False
        if self._wake_handle is None:
            self._wake_handle = asyncio.get_running_loop().call_later(window + WAKE_S,
                                                                      self._wake)
        return True

    def _wake(self) -> None:
        """A held batch must never wait for a play that will not come: Faust skips the
        buffered messages while its flow control is off (a rebalance, shutdown), and then
        waits for every tracked play to be acked. Until the batch is applied, put a wake-up
        in the stream buffer every few ms; the loop applies the batch on it."""
        self._wake_handle = None
        if self.batch and self.stream is not None:
            self.stream.wake(_WAKE)  # a full buffer will be drained: try again then
            self._wake_handle = asyncio.get_running_loop().call_later(WAKE_S, self._wake)

    def _release(self) -> list[Any]:
        events = self.batch[:]
        self.batch.clear()
        handle, self._wake_handle = self._wake_handle, None
        if handle is not None:
            handle.cancel()
        return events

    # ------------------------------------------------------------------ one batch

    async def apply(self, events: list[Any]) -> None:
        """Apply a gathered batch, then ack each play (see the module docstring)."""
        stream = self.stream
        assert stream is not None
        if self.turns is not None:
            await self.turns.room()
        # after the wait for a turn: a freeze during it is seen before any play is applied
        if self.freeze_fence is not None:
            self.freeze_fence.check(time.monotonic())
        step_cpu = time.thread_time()
        live, records, reread = self._live(stream, events)
        started = time.perf_counter()
        self._pace(live, started)
        stage_totals: dict[str, float] = {}
        set_current = stream.set_current_event
        outcomes = self.processor.process_batch(
            records, stage_totals, lambda i: set_current(live[i])
        )
        per_event = (time.perf_counter() - started) / len(records) if records else 0.0
        await self._hand_on(outcomes, stage_totals, per_event)
        self._ack(stream, live)
        set_current(None)
        if records:  # the loop's own CPU for this step, per play: the next batches' bound
            self.max_batch = self.sizer.observe(
                (time.thread_time() - step_cpu) / len(records), len(records))
        if reread:
            await self._read_again(reread)
        self.stall_watch.progress(time.monotonic())
        await self._after()

    def _live(
        self, stream: BatchingStream, events: list[Any]
    ) -> tuple[list[Any], list[Record], dict[Any, int]]:
        """The events to apply, as pipeline records, and the partitions to read again (from
        the offset given) because their stream skipped records (the fence)."""
        generation = self.app.consumer_generation_id
        fence = self._fence()
        consumer: Any = self.app.consumer  # the seam's (SeamConsumer) when there is a fence
        live: list[Any] = []
        records: list[Record] = []
        stale = 0
        reread: dict[Any, int] = {}
        for ev in events:
            msg = ev.message
            if msg.generation_id != generation:
                # a rebalance happened while these were buffered: drop them as Faust
                # drops a stale generation's messages (the new owner reads them again)
                stream.ack_processed(ev)
                stale += 1
                continue
            if fence is not None:
                tp = msg.tp
                fresh = True
                if fence.rereading and tp in fence.rereading:  # the first read again yet?
                    fresh = msg is consumer.first_after_reread(tp)
                absent = fence.absent
                again = fence.admit(tp, msg.offset, fresh)
                if fence.absent != absent:
                    logger.warning(
                        "%s: read again from %d, the first record is %d: the %d offsets in "
                        "between are not in the log (markers, compaction or retention)",
                        tp, msg.offset - (fence.absent - absent), msg.offset,
                        fence.absent - absent)
                if again is not None:  # not applied: a hole, or on its way before a reread
                    stream.drop_unapplied(ev)
                    if again == WAIT:
                        # its reread's seek never ran (the batch that found the hole
                        # failed before it): ask for it again, or the partition waits
                        pending = fence.rereading[tp]
                        if self.sought.get(tp) != pending:
                            reread.setdefault(tp, pending)
                    else:
                        reread.setdefault(tp, again)
                    continue
            live.append(ev)
            records.append(  # positional (topic, partition, offset, key, value, timestamp_ms):
                build_record(  # Record(...) without its frozen __init__ (~0.5 us a play)
                    msg.topic,
                    msg.partition,
                    msg.offset,
                    msg.key,
                    msg.value,
                    int(msg.timestamp * 1000) if msg.timestamp else None,
                )
            )
        if stale:
            self.telemetry.stale_dropped(stale)
            logger.info("dropped %d plays of an ended consumer generation (their partitions' "
                        "owner reads them again)", stale)
        return live, records, reread

    def _fence(self) -> OffsetFence | None:
        """The offset fence, reset after each seek of the consumer (None on a consumer that
        does not record where its streams start: not the seam's)."""
        consumer: Any = self.app.consumer
        epoch = getattr(consumer, "seek_epoch", None)
        if epoch is None:
            return None
        if epoch != self.fence.epoch:
            self.fence.reset(consumer.start_offsets, epoch)
            self.sought.clear()
        return self.fence

    async def _read_again(self, reread: dict[Any, int]) -> None:
        """Seek each partition whose stream skipped records back to the first one missing."""
        for tp, offset in reread.items():
            self.skips_detected += 1
            if self.skips_detected <= 10 or self.skips_detected % 1000 == 0:
                logger.error(
                    "%s: the stream skipped records from offset %d (never delivered to the "
                    "agent); not applying what came after them, reading again from %d "
                    "(%d time(s) so far)", tp, offset, offset, self.skips_detected)
            consumer: Any = self.app.consumer  # the seam's: only it has a fence
            await consumer.read_again(tp, offset)
            self.sought[tp] = offset

    def _pace(self, live: list[Any], now: float) -> None:
        """The backlog behind this batch, per partition (the fetched highwater)."""
        last = {ev.message.tp: ev.message for ev in live}
        backlog = any(self.fetched_behind(msg) >= CATCH_UP_PLAYS for msg in last.values())
        self.pacing.batch_applied(now, not self.processor.rank_waiting(), backlog)
        if backlog:
            self.telemetry.catch_up_batch()

    async def _hand_on(
        self, outcomes: list[Outcome], stage_totals: dict[str, float], per_event: float
    ) -> None:
        await self.dead_letters.send_queued()
        evicted = self.processor.take_evicted_tracks()
        if evicted:
            self.telemetry.tracks_evicted(evicted)
        self.telemetry.observe_batch(outcomes, stage_totals, per_event)
        if not self.signals.enabled:  # SignalPublisher.add would drop each one
            return
        for outcome in outcomes:
            if (
                outcome.outcome == "processed"
                and outcome.update is not None
                and outcome.event is not None
                and outcome.model_error is None
            ):
                # tell the other workers what this play teaches about tracks
                self.signals.add(outcome.update, outcome.event, outcome.learned)

    def _ack(self, stream: BatchingStream, live: list[Any]) -> None:
        offsets = self.processed_offsets
        for ev in live:
            msg = ev.message
            offsets[msg.tp] = msg.offset
            # applied (its state is in the table, its changelog record is dirty and a
            # commit sends that first): now its offset may be committed
            stream.ack_processed(ev)

    async def _after(self) -> None:
        if self.sessions_bound is not None:
            self.sessions_bound.after_batch()
        if self.processor.eviction_due:
            await self.models.evict_due()
        if self.processor.rank_waiting():
            self.ranker.wake()
        now = time.perf_counter()
        sessions = self.sessions
        if sessions.dirty and (
            now - self._changelog_sent > CHANGELOG_SEND_S or sessions.dirty >= CHANGELOG_BATCH
        ):
            self._changelog_sent = now
            await self._send_changelog()
        # Under a backlog the stream hands over buffered events without suspending; give
        # the ranker and the Redis writer a turn every few ms so freshness stays bounded.
        if now - self._yielded > YIELD_S:
            self._yielded = now
            await asyncio.sleep(0)

    async def _send_changelog(self) -> None:
        try:
            await self.sessions.send_dirty()
        except Exception as exc:  # noqa: BLE001 - kept dirty; the commit retries
            self._changelog_failures += 1
            n = self._changelog_failures
            if n in (1, 10) or n % 1000 == 0:
                logger.warning("session changelog send failed %d time(s), kept pending "
                               "(the commit retries): %r", n, exc)
