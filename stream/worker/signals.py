"""Track signals between workers (:mod:`stream.processing.replication`): what each applied
play teaches about tracks goes to the signals topic (:class:`SignalPublisher`), and every
worker applies the others' signals to its item-side models (:class:`SignalReader`).

Signals are authenticated with ``worker_keys`` (:mod:`stream.processing.auth`); without a
key they are neither sent nor applied, unless ``worker_insecure`` allows unsigned ones. Each
message carries its sender's sequence number and send time inside the signed value, so a
replayed or stale one is refused (:class:`stream.processing.replication.ReplayGuard`).

The same topic carries forgets (:meth:`SignalPublisher.broadcast_forget`): a listener one
worker forgot is dropped from every other worker's models too (their model state may come
from a shared checkpoint or from before a rebalance).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from stream.config import Settings
from stream.core.events import PlayEvent
from stream.core.recommender import LearnResult, Recommender
from stream.core.session import SessionUpdate
from stream.core.signal_positions import SignalPositions
from stream.faustx.kafka_client import cluster_metadata
from stream.processing.auth import KeyRing
from stream.processing.ratelog import RateLimitedLog
from stream.processing.replication import (
    ReplayGuard,
    TrackSignal,
    apply_signals,
    decode_batch,
    encode_batch,
    signal_from,
)
from stream.worker.replica_sync import seek_signals
from stream.worker.telemetry import Telemetry

logger = logging.getLogger(__name__)

#: the MAC's purpose for track signals (stream.processing.auth)
SIGNALS_PURPOSE: Final = b"signals"
#: pending track signals go out at most this often (seconds), or once CHUNK wait
SIGNALS_SEND_S: Final = 0.05
#: most signals in one record
CHUNK: Final = 1000


def worker_keys(settings: Settings) -> KeyRing:
    """The key ring of ``worker_keys`` (signals, control commands); says at start-up what
    an unset or insecure configuration means."""
    ring = KeyRing.parse(settings.worker_keys)
    if not ring:
        logger.warning(
            "worker_keys is not set: %s",
            "track signals and control commands are accepted UNSIGNED (worker_insecure=true)"
            if settings.worker_insecure
            else "track signals are not shared between workers and control commands "
            "(stream forget) are refused; set STREAM_WORKER_KEYS=kid:secret (see "
            "docs/reliability.md) or STREAM_WORKER_INSECURE=true on a trusted network",
        )
    elif settings.worker_insecure:
        logger.warning("worker_insecure=true: unsigned track signals and control commands "
                       "are accepted (signed ones are verified)")
    return ring


class SignalPublisher:
    """Collects this worker's signals and sends them in batches: at most every
    SIGNALS_SEND_S (they are advisory, for the other workers' item models; one send per
    Redis flush was ~200 sends/s at 1,000 plays/s), at once when CHUNK wait or when
    ``force``d (a stop). The similar-lists timer flushes too, so none waits long after plays
    stop."""

    def __init__(
        self,
        topic: Any,
        topic_name: str,
        ring: KeyRing,
        worker_id: str,
        settings: Settings,
        telemetry: Telemetry,
    ) -> None:
        self.topic = topic
        self.topic_name = topic_name
        self.ring = ring
        self.worker_id = worker_id
        self.key = worker_id.encode()
        #: signals go out only when they can be authenticated, or when the operator
        #: explicitly allowed unsigned ones
        self.enabled = bool(ring) or settings.worker_insecure
        self.telemetry = telemetry
        self.pending: list[TrackSignal] = []
        self._sent = 0.0
        #: this worker's message counter (ReplayGuard); every send takes the next one
        self._seq = 0

    def _send(self, sigs: Sequence[TrackSignal],
              forgets: Sequence[tuple[str, int]] = ()) -> None:
        """One signed message: in order with this worker's others (send_soon's FIFO)."""
        self._seq += 1
        value = encode_batch(self.worker_id, list(sigs), seq=self._seq,
                             sent_ms=int(time.time() * 1000), forgets=forgets)
        headers = self.ring.sign(SIGNALS_PURPOSE, self.topic_name, self.key, value)
        self.topic.send_soon(key=self.key, value=value, headers=headers)

    def broadcast_forget(self, user_id: str, forget_ms: int) -> None:
        """Tell every worker to drop a forgotten listener's model state (on the signals
        topic, signed, in order with this worker's signals)."""
        if self.enabled:
            self._send([], forgets=[(user_id, forget_ms)])

    def add(self, update: SessionUpdate, event: PlayEvent,
            learned: LearnResult | None = None) -> None:
        """What this applied play teaches about tracks (with ``learned``, the item step
        the recommender took: docs/scaling.md). Nothing is built when signals cannot be
        sent (see ``enabled``): :meth:`flush` would drop it."""
        if self.enabled:
            self.pending.append(signal_from(self.worker_id, update, event, learned))

    def flush_for_commit(self) -> None:
        """Hand every pending signal to the producer now: called by the pre-commit flush
        (the app's ``before_commit``), which then waits for them with the changelog, so
        no play's offset is committed before its signal is in Kafka (a SIGKILL between
        the two used to lose the signal: docs/scaling.md)."""
        self.flush(force=True)

    def flush(self, force: bool = False) -> None:
        pending = self.pending
        if not pending:
            return
        if not self.enabled:
            pending.clear()  # nobody could authenticate them (see worker_keys)
            return
        now = time.perf_counter()
        if not force and len(pending) < CHUNK and now - self._sent < SIGNALS_SEND_S:
            return
        self._sent = now
        for i in range(0, len(pending), CHUNK):
            # keyed by the sender, so every worker's reader skips its own batches without
            # decoding them (a single worker used to re-parse every signal it sent)
            self._send(pending[i : i + CHUNK])
        self.telemetry.signals("sent", len(pending))
        pending.clear()


class SignalReader:
    """Broadcast consumer of the signals topic: all partitions, no consumer group, from the
    end, or from the signals positions a restored checkpoint includes (``positions``:
    :mod:`stream.core.signal_positions`, docs/scaling.md). Applies the other workers' valid
    signals to this worker's item-side models."""

    def __init__(
        self,
        settings: Settings,
        topic_name: str,
        ring: KeyRing,
        worker_id: str,
        recommender: Recommender,
        models_free: Callable[[], Awaitable[None]],
        telemetry: Telemetry,
        forget_model_state: Callable[[str], bool] | None = None,
        positions: SignalPositions | None = None,
    ) -> None:
        self.settings = settings
        self.topic_name = topic_name
        #: where this worker's item state stands in the signals topic
        self.positions = positions if positions is not None else SignalPositions(worker_id)
        self.ring = ring
        self.worker_id = worker_id
        self.key = worker_id.encode()
        self.recommender = recommender
        self.models_free = models_free
        self.telemetry = telemetry
        self.log = RateLimitedLog(logging.getLogger("stream.signals"), level=logging.WARNING)
        self.consumer: Any = None
        self._stopping = False
        self.replay_guard = ReplayGuard(max_future_ms=settings.max_future_s * 1000)
        #: drops a listener's model state (Processor.forget_model_state), for the forgets
        #: other workers broadcast
        self.forget_model_state = forget_model_state
        #: forgets admitted, not yet applied (applied with the models free)
        self.received_forgets: list[tuple[str, int]] = []
        #: the send time (ms) of the last record admit() let through (None: none, or unknown)
        self.admitted_sent_ms: int | None = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from stream.adapters.kafka import client_kwargs

        self.consumer = AIOKafkaConsumer(
            **client_kwargs(self.settings), enable_auto_commit=False, group_id=None
        )
        await self.consumer.start()
        parts = await self._partitions()
        tps = [TopicPartition(self.topic_name, p) for p in sorted(parts)]
        if tps:
            self.consumer.assign(tps)
            await seek_signals(self.consumer, tps, self.positions)
        else:
            logger.warning("signals topic %s not found; not sharing", self.topic_name)

    async def _partitions(self) -> set[int]:
        """The signals topic's partitions (Faust declares the topic during its own start-up:
        wait up to ~10 s for it)."""
        cluster = await cluster_metadata(self.consumer)
        for _ in range(50):
            parts = cluster.partitions_for_topic(self.topic_name)
            if parts:
                return set(parts)
            await asyncio.sleep(0.2)
            cluster = await cluster_metadata(self.consumer)
        return set()

    async def stop(self) -> None:
        self._stopping = True
        if self.consumer is not None:
            await self.consumer.stop()

    async def run(self) -> None:
        """Apply the other workers' signals until stopped."""
        while not self._stopping:
            if self.consumer is None or not self.consumer.assignment():
                await asyncio.sleep(0.5)
                continue
            batch = await self.consumer.getmany(timeout_ms=200, max_records=2000)
            for records in batch.values():
                for r in records:
                    if r.key != self.key:  # our own signals: already learned locally
                        await self._apply(r, self.admit(r))
                    else:
                        self.positions.handled(r.partition, r.offset)
                await asyncio.sleep(0)  # let the agent run between partitions

    async def _apply(self, r: Any, sigs: list[TrackSignal]) -> None:
        if sigs or self.received_forgets:
            await self.models_free()  # never while an eviction runs
            self.apply_forgets()
        # no await from here to handled(): a checkpoint forked in between would hold the
        # record's signals without its position
        counts = apply_signals(self.recommender, sigs)
        self.positions.handled(r.partition, r.offset)
        if counts.applied:
            self.telemetry.signals("applied", counts.applied)
            if self.admitted_sent_ms is not None:  # the replication delay of this message
                self.telemetry.signal_delay(time.time() - self.admitted_sent_ms / 1000)
        if counts.errors:
            self.telemetry.signals("error", counts.errors)
        for reason in counts.blend_dropped:  # applied without their learned-blend rows
            self.telemetry.signal_rejected(reason)

    def apply_forgets(self) -> None:
        """Drop the model state of listeners another worker forgot (review finding 1)."""
        forgets = self.received_forgets
        while forgets:
            user, _ = forgets.pop()
            if self.forget_model_state is None:
                continue
            dropped = self.forget_model_state(user)
            self.telemetry.control("forgotten_remote" if dropped
                                   else "forgotten_remote_unknown")

    def admit(self, r: Any) -> list[TrackSignal]:
        """The valid signals of one signals record from another worker: authenticated
        (stream.processing.auth) and validated (replication.decode_batch); the rest is
        counted in stream_signals_rejected_total{reason} and logged (rate-limited)."""
        s = self.settings
        self.admitted_sent_ms = None
        problem = self.ring.verify(r.headers, SIGNALS_PURPOSE, self.topic_name, r.key, r.value)
        if problem is not None and not (s.worker_insecure and problem == "unsigned"):
            self.telemetry.signal_rejected(problem)
            self.log.log(problem, "dropped signals record %s[%d]@%d: %s",
                         r.topic, r.partition, r.offset, problem)
            return []
        decoded = decode_batch(
            r.value, now_ms=int(time.time() * 1000), max_future_ms=s.max_future_s * 1000
        )
        for reason in decoded.rejected:
            self.telemetry.signal_rejected(reason)
        if decoded.rejected:
            self.log.log(decoded.rejected[0], "dropped %d signal(s) of %s[%d]@%d: %s",
                         len(decoded.rejected), r.topic, r.partition, r.offset,
                         ", ".join(sorted(set(decoded.rejected))))
        if decoded.worker == self.worker_id:
            return []
        if not decoded.signals and not decoded.forgets:
            return []
        # replay protection: the sender's sequence number and send time (signed)
        replay = self.replay_guard.check(decoded.worker, decoded.seq, decoded.sent_ms,
                                         int(time.time() * 1000))
        if replay is not None:
            self.telemetry.signal_rejected(replay)
            self.log.log(replay, "dropped signals record %s[%d]@%d: %s", r.topic,
                         r.partition, r.offset, replay)
            return []
        self.received_forgets.extend(decoded.forgets)
        self.admitted_sent_ms = decoded.sent_ms  # signed: when its sender sent it
        keep = self.positions.should_apply  # not those a restored checkpoint already holds
        return [s for s in decoded.signals if keep(decoded.worker, s.seq)]
