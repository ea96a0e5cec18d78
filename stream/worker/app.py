"""The Faust app: topics, the session table and the agents. The app itself, and every
adaptation of Faust it needs, comes from the seam (:mod:`stream.faustx`).

The agent is thin: for each record it calls :class:`stream.processing.pipeline.Processor` (which
holds all the logic), forwards rejections to the dead-letter topic, and keeps metrics. Redis
writes are handed to a :class:`stream.adapters.redis_store.RecoWriter` that runs as a Faust/mode
service, so the agent never waits for a Redis round trip.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import logging
import time
import uuid
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faust
import mode
import orjson
from faust.serializers import codecs
from faust.types import TP

from stream import __version__
from stream.adapters.kafka import signals_topic
from stream.adapters.metrics import Metrics
from stream.adapters.redis_store import (
    WRITE_ERROR_REASONS,
    PendingWrite,
    RecoWriter,
    add_tombstone,
    catalog_commands,
    checkpoint_key,
    connect_async,
    read_track_names,
    save_checkpoint,
    tombstones_key,
)
from stream.config import Settings, redis_auth
from stream.core.catalog import TrackInfo
from stream.core.checkpoint import checkpoint_mode, seal_models, settings_keys
from stream.core.events import Rejection, escape_text
from stream.core.recommender import Recommender
from stream.core.session import UserState
from stream.core.sizing import model_memory_bytes
from stream.faustx import shutdown
from stream.faustx.app import create_app
from stream.faustx.kafka_client import cluster_metadata
from stream.faustx.stream import BatchingStream
from stream.faustx.tablestore import table_options
from stream.processing.auth import KeyRing
from stream.processing.pipeline import OUTCOMES, DeadLetter, Processor, Record
from stream.processing.ratelog import RateLimitedLog
from stream.processing.replication import (
    TrackSignal,
    apply_signal,
    decode_batch,
    encode_batch,
    signal_from,
)
from stream.worker.snapshot import build_in_child, can_fork
from stream.worker.watchdog import LoopLagProbe, StallWatch

logger = logging.getLogger(__name__)


USER_STATE_CODEC = "user_state"
#: the MAC's purpose for track signals (stream.processing.auth)
SIGNALS_PURPOSE = b"signals"
#: Kafka's timestamp type of a record whose timestamp the broker set at append time
LOG_APPEND_TIME = 1


def _encode_array(obj: Any) -> str:
    if isinstance(obj, array):
        return base64.b64encode(obj.tobytes()).decode()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


class UserStateCodec(codecs.Codec):
    """Changelog values: UserState <-> orjson bytes (the table keeps live objects)."""

    def _dumps(self, obj: Any) -> bytes:
        # orjson serialises the slotted dataclass natively (2x faster than to_dict());
        # the fingerprint ring goes out as base64, which UserState.from_dict reads back
        return orjson.dumps(obj, default=_encode_array)

    def _loads(self, s: bytes) -> Any:
        return UserState.from_dict(orjson.loads(s))


codecs.register(USER_STATE_CODEC, UserStateCodec())


@dataclass
class Worker:
    """Everything a running worker holds, handy for tests and the CLI."""

    app: faust.App
    settings: Settings
    metrics: Metrics
    recommender: Recommender
    writer: RecoWriter | None = None
    processed_offsets: dict[TP, int] = field(default_factory=dict)
    #: The live prequential evaluator (a windowed ``stream.core.evaluation.Prequential``) once the
    #: agent feeds it; the report timer exports its summary as the quality metrics.
    evaluator: Any = None


#: the agent hands the session changelog to the producer at least this often (seconds)
#: or once this many listeners are pending: a listener's plays within the window cost one
#: record, and a commit sends whatever is pending first anyway
CHANGELOG_SEND_S = 0.02
#: pending track signals (for the other workers' item models) go out at most this often
SIGNALS_SEND_S = 0.05
CHANGELOG_BATCH = 256
#: loop turns the plays agent yields, at most, for Faust's fetcher to hand over the next
#: buffered message (it takes two or three: a task per message and an asyncio.wait)
HANDOVER_TURNS = 3
#: longest the plays agent gathers a batch when no backlog waits (a play's freshness pays
#: for it); once BACKLOG_PLAYS wait behind a play on its partition (tens of ms of queue
#: already: throughput is what shortens it), it gathers up to ``agent_batch_ms``
LIVE_GATHER_S = 0.002
BACKLOG_PLAYS = 8
#: a partition this many plays behind is a backlog being drained: rankings are then
#: coalesced over up to ``catch_up_rank_ms`` (see rank_pending in create_worker)
CATCH_UP_PLAYS = 256
#: how often the "more like this" refresh runs while plays wait in the stream buffer
SIMILAR_BACKLOG_S = 1.0
#: how often a held batch re-sends its wake-up (see process_plays in create_worker)
WAKE_S = 0.005
#: the plays agent's wake-up value (never a Kafka record)
_WAKE: Any = object()

#: a checkpoint's snapshot child is killed (and the checkpoint counted as an error) after this
CHECKPOINT_CHILD_TIMEOUT_S = 120.0


def create_worker(
    settings: Settings,
    metrics: Metrics,
    partitions: int,
    recommender: Recommender | None = None,
) -> Worker:
    """Build the Faust app for these settings. ``partitions`` is the plays topic's count."""
    app = create_app(settings, partitions)
    recommender = recommender if recommender is not None else Recommender(
        blend=settings.ranker, session_models=settings.ranker == "learned")
    if isinstance(recommender, Recommender):  # also one restored from a checkpoint
        recommender.use_ranker(settings.ranker)
        logger.info("ranker: %s (setting ranker; session models %s)", settings.ranker,
                    "on" if recommender.session_models else "off")
    limit_users = getattr(recommender, "limit_users", None)
    if callable(limit_users):  # also bounds a recommender restored from a checkpoint
        limit_users(settings.max_users or None)
    worker = Worker(app=app, settings=settings, metrics=metrics, recommender=recommender)
    metrics.build.info(
        {
            "version": __version__,
            "model_version": recommender.model_version,
            "app_id": settings.app_id,
        }
    )

    plays = app.topic(
        settings.plays_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partitions,
    )
    dlq = app.topic(settings.dlq_topic, key_serializer="raw", value_serializer="raw")
    signals_name = signals_topic(settings)  # created by ensure_topics; read by SignalReader
    ring = KeyRing.parse(settings.worker_keys)
    #: signals go out (and are applied) only when they can be authenticated, or when the
    #: operator explicitly allowed unsigned ones
    share_signals = bool(ring) or settings.worker_insecure
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
    signals = app.topic(signals_name, key_serializer="raw", value_serializer="raw")
    worker_id = uuid.uuid4().hex[:12]
    worker_key = worker_id.encode()
    control = app.topic(
        settings.control_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partitions,
    )
    sessions = app.batched_table(
        "sessions",
        default=None,
        partitions=partitions,
        schema=faust.Schema(key_serializer="json", value_serializer=USER_STATE_CODEC),
        help="Per-listener session state (stream.core.session.UserState.to_dict()).",
        **table_options(settings),
    )
    # Faust derives the changelog serializers from key/value *types* (and they override the
    # schema's), so name the codecs explicitly: live UserState objects in the store,
    # orjson on the changelog, and UserState objects back on recovery.
    sessions.key_serializer = "json"
    sessions.value_serializer = USER_STATE_CODEC

    topic = settings.plays_topic
    m = metrics
    m.init_topic(topic, OUTCOMES)

    written_counter = m.redis_writes.labels("written")
    stale_counter = m.redis_writes.labels("stale_skipped")

    def on_flush(batch: list[PendingWrite], results: list[int], seconds: float) -> None:
        now = time.time()
        m.redis_flush.observe(seconds)
        written = 0
        for write, result in zip(batch, results, strict=True):
            if result:
                written += 1
                if not write.fresh:
                    continue
                m.freshness.observe(max(0.0, now - write.event_ts_ms / 1000.0))
                if write.ingest_ts_ms:
                    m.ingest_freshness.observe(max(0.0, now - write.ingest_ts_ms / 1000.0))
        written_counter.inc(written)
        if len(batch) > written:
            stale_counter.inc(len(batch) - written)
        m.redis_pending.set(len(worker.writer.pending) if worker.writer else 0)

    def on_error(exc: Exception, seconds: float) -> None:
        m.redis_errors.labels("flush").inc()
        m.redis_retries.inc()

    lag_task: list[asyncio.Task[None] | None] = [None]

    write_error_counters = {r: m.redis_write_errors.labels(r) for r in WRITE_ERROR_REASONS}
    dropped_counter = m.redis_writes.labels("dropped")

    def on_key_error(kind: str, reason: str, dropped: bool) -> None:
        write_error_counters[reason].inc()
        if dropped and kind == "doc":
            dropped_counter.inc()

    class RedisWriterService(mode.Service):
        """Owns the Redis connection and the flusher; drains pending writes on stop."""

        async def on_start(self) -> None:
            client = connect_async(settings.redis_url, **redis_auth(settings))
            worker.writer = RecoWriter(
                client,
                ttl_s=settings.reco_ttl_s,
                channel=settings.notify_channel,
                flush_interval_ms=settings.redis_flush_interval_ms,
                max_batch=settings.redis_max_batch,
                retry_max_s=settings.redis_retry_max_s,
                on_flush=on_flush,
                on_error=on_error,
                before_flush=rank_pending,
                has_work=lambda: bool(processor.pending_rank),
                on_key_error=on_key_error,
            )
            worker.writer.start()
            lag_task[0] = asyncio.get_running_loop().create_task(loop_lag.run(),
                                                                 name="loop-lag-probe")

        async def on_stop(self) -> None:
            if lag_task[0] is not None:
                lag_task[0].cancel()
            if worker.writer is not None:
                if checkpoints_on:
                    # a clean stop keeps everything learned (in-process: nothing to hide
                    # from the event loop now, and no child to outlive the worker)
                    await write_checkpoint(in_child=False)
                write_catalog(counts=True)  # the play counts not written yet
                await worker.writer.stop()
                flush_signals(force=True)  # what the last plays taught, for the others
                await worker.writer.client.aclose()

    class SignalReader(mode.Service):
        """Broadcast consumer of the signals topic: all partitions, no consumer group, from
        the end (a restored checkpoint already holds what came before). Applies the other
        workers' signals to this worker's item-side models."""

        consumer: Any = None

        async def on_start(self) -> None:
            from aiokafka import AIOKafkaConsumer, TopicPartition

            from stream.adapters.kafka import client_kwargs

            self.consumer = AIOKafkaConsumer(
                **client_kwargs(settings), enable_auto_commit=False, group_id=None
            )
            await self.consumer.start()
            cluster = await cluster_metadata(self.consumer)
            for _ in range(50):  # Faust declares the topic during its own start-up
                parts = cluster.partitions_for_topic(signals_name)
                if parts:
                    break
                await asyncio.sleep(0.2)
                cluster = await cluster_metadata(self.consumer)
            else:
                parts = set()
            tps = [TopicPartition(signals_name, p) for p in sorted(parts)]
            if tps:
                self.consumer.assign(tps)
                await self.consumer.seek_to_end(*tps)
            else:
                logger.warning("signals topic %s not found; not sharing", signals_name)

        async def on_stop(self) -> None:
            if self.consumer is not None:
                await self.consumer.stop()
            if lag_client[0] is not None:
                await lag_client[0].stop()

        @mode.Service.task
        async def _apply(self) -> None:
            while not self.should_stop:
                if self.consumer is None or not self.consumer.assignment():
                    await self.sleep(0.5)
                    continue
                batch = await self.consumer.getmany(timeout_ms=200, max_records=2000)
                for records in batch.values():
                    for r in records:
                        if r.key == worker_key:
                            continue  # our own signals: already learned locally
                        sigs = admit_signals(r)
                        if sigs:
                            await models_free()  # never while an eviction runs
                        for sig in sigs:
                            try:
                                apply_signal(recommender, sig)
                            except Exception as exc:  # noqa: BLE001 - advisory data
                                m.signals.labels("error").inc()
                                logger.debug("could not apply a track signal: %r", exc)
                                continue
                            m.signals.labels("applied").inc()
                    await asyncio.sleep(0)  # let the agent run between partitions

    app.service(SignalReader())  # type: ignore[arg-type]

    signal_log = RateLimitedLog(logging.getLogger("stream.signals"), level=logging.WARNING)
    signals_rejected = m.signals_rejected

    def admit_signals(r: Any) -> list[TrackSignal]:
        """The valid signals of one signals record from another worker: authenticated
        (stream.processing.auth) and validated (stream.processing.replication.decode_batch); the
        rest is counted in stream_signals_rejected_total{reason} and logged (rate-limited)."""
        problem = ring.verify(r.headers, SIGNALS_PURPOSE, signals_name, r.key, r.value)
        if problem is not None and not (settings.worker_insecure and problem == "unsigned"):
            signals_rejected.labels(problem).inc()
            signal_log.log(problem, "dropped signals record %s[%d]@%d: %s",
                           r.topic, r.partition, r.offset, problem)
            return []
        decoded = decode_batch(
            r.value, now_ms=int(time.time() * 1000), max_future_ms=settings.max_future_s * 1000
        )
        for reason in decoded.rejected:
            signals_rejected.labels(reason).inc()
        if decoded.rejected:
            signal_log.log(decoded.rejected[0], "dropped %d signal(s) of %s[%d]@%d: %s",
                           len(decoded.rejected), r.topic, r.partition, r.offset,
                           ", ".join(sorted(set(decoded.rejected))))
        if decoded.worker == worker_id:
            return []
        return decoded.signals

    writer_service = RedisWriterService()
    app.service(writer_service)  # type: ignore[arg-type]

    pending_writes: deque[PendingWrite] = deque()
    pending_forgets: deque[str] = deque()
    #: the plays agent's "is the stream buffer empty" (set once the agent starts)
    plays_buffer: list[Callable[[], bool]] = []
    dead_letters: deque[DeadLetter] = deque()

    def submit(write: PendingWrite) -> None:
        if worker.writer is not None:
            worker.writer.submit(write)
        else:  # writer not started yet (first events during start-up)
            pending_writes.append(write)

    from stream.core.evaluation import Prequential

    # live quality: HR@10 / NDCG@10 of the list each listener had before their next play
    worker.evaluator = Prequential(k=10, window=settings.quality_window)
    processor = Processor(
        settings,
        recommender,
        sessions,
        submit,
        dead_letters.append,
        evaluator=worker.evaluator,
        defer_ranking=True,
        defer_eviction=True,
    )
    rank_stage = m.stage.labels("rank")

    #: the catalogue eviction running in a thread (a future), or None. While it runs,
    #: nothing on the event loop touches the models: the plays agent awaits it, and the
    #: writer's ranking hook, the "more like this" refresh, the signals reader, the model
    #: checkpoint and the memory gauge wait or skip their turn (see models_busy).
    evicting: list[asyncio.Future[None] | None] = [None]

    def models_busy() -> bool:
        return evicting[0] is not None

    async def evict_off_loop() -> None:
        """Run the eviction the last batch asked for (a catalogue above max_tracks) in a
        thread: at the 500k-track cap it takes ~0.1-0.4 s of CPU, mostly a compiled pass
        that releases the GIL and dictionary work in ~1 ms slices, so the event loop keeps
        heartbeats, fetches and Redis flushes going (docs/benchmarks.md, "Eviction at the
        track cap"). If this task is cancelled (a stop), the thread still finishes, and
        models_busy() stays true until it has."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, processor.evict_due)
        evicting[0] = fut

        def finished(f: asyncio.Future[None]) -> None:
            evicting[0] = None
            if not f.cancelled() and f.exception() is not None:
                m.model_errors.inc()
                processor._model_error(f.exception(), None)  # type: ignore[arg-type]
            for seconds in processor.eviction_seconds:
                m.eviction_seconds.observe(seconds)
            processor.eviction_seconds.clear()
            if worker.writer is not None and processor.pending_rank:
                worker.writer.wake()

        fut.add_done_callback(finished)
        with contextlib.suppress(Exception):  # reported by finished()
            await asyncio.shield(fut)

    async def models_free(timeout_s: float = 30.0) -> None:
        """Wait (bounded) for a running eviction to finish."""
        deadline = time.monotonic() + timeout_s
        while models_busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    def consumer_state() -> dict[str, Any]:
        consumer = app.seam_consumer
        buffer = app.producer.buffer
        return {
            "assigned": sorted(str(tp) for tp in consumer.assignment() if tp.topic == topic),
            "paused": sorted(str(tp) for tp in consumer.paused_partitions()),
            "flow_active": app.flow_control.is_active(),
            "committing": consumer.committing,
            "producer_buffer": getattr(buffer, "size", None),
            "processed_offsets": {str(tp): o for tp, o in worker.processed_offsets.items()},
            "redis_pending": len(worker.writer.pending) if worker.writer else None,
        }

    stall_watch = StallWatch(after_s=settings.stall_warning_s, describe_state=consumer_state)

    def on_loop_lag(seconds: float) -> None:
        m.loop_lag.observe(seconds)
        if seconds >= loop_lag.max_lag:
            m.loop_lag_max.set(seconds)

    loop_lag = LoopLagProbe(on_lag=on_loop_lag)

    pending_signals: list[TrackSignal] = []

    signals_sent = [0.0]

    def flush_signals(force: bool = False) -> None:
        """Send the pending track signals: at most every SIGNALS_SEND_S (they are advisory,
        for the other workers' item models; one send per Redis flush was ~200 sends/s at
        1,000 plays/s), at once when 1,000 wait or when ``force``d (a stop). The 10 Hz
        refresh_similar timer calls it too, so none waits long after plays stop."""
        if not pending_signals:
            return
        if not share_signals:
            pending_signals.clear()  # nobody could authenticate them (see worker_keys)
            return
        now = time.perf_counter()
        if not force and len(pending_signals) < 1000 and now - signals_sent[0] < SIGNALS_SEND_S:
            return
        signals_sent[0] = now
        for i in range(0, len(pending_signals), 1000):
            chunk = pending_signals[i : i + 1000]
            # keyed by the sender, so every worker's reader skips its own batches without
            # decoding them (a single worker used to re-parse every signal it sent)
            value = encode_batch(worker_id, chunk)
            headers = ring.sign(SIGNALS_PURPOSE, signals_name, worker_key, value)
            signals.send_soon(key=worker_key, value=value, headers=headers)
        m.signals.labels("sent").inc(len(pending_signals))
        pending_signals.clear()

    #: [0]: a real backlog waits (CATCH_UP_PLAYS behind on a partition at the last batch);
    #: [1]: when the listeners waiting to be ranked started waiting (perf_counter)
    catch_up: list[Any] = [False, 0.0]
    catch_up_s = settings.catch_up_rank_ms / 1000.0

    def rank_pending() -> None:
        """The Redis writer's pre-flush hook: rank the listeners with new plays. While a
        real backlog is being drained, a listener's rankings are coalesced over up to
        ``catch_up_rank_ms`` (their plays come back to back then, and each list would be
        replaced within milliseconds; at 200 ms, 0.42 rankings per play instead of 0.72
        in a P1 drain, ~10 % more plays/s). A play waits at least ~250 ms in such a
        backlog anyway. Otherwise every flush ranks everyone pending."""
        if catch_up[0] and time.perf_counter() - catch_up[1] < catch_up_s:
            return  # the agent wakes the writer again after its next batch
        if models_busy():
            return  # the eviction wakes the writer when it is done
        processor.rank_pending(on_ranked=rank_stage.observe)
        flush_signals()
        write_catalog(counts=False)

    def write_catalog(counts: bool) -> None:
        """Queue the track catalogue's writes on the Redis writer: first sightings and
        changed names with every flush, the coalesced play counts when ``counts``."""
        if worker.writer is None:
            return
        changes = processor.catalog.take_changes()
        plays = processor.catalog.take_counts() if counts else {}
        if changes or plays:
            worker.writer.submit_commands(
                catalog_commands(settings.catalog_prefix, changes, plays, settings.catalog_ttl_s)
            )

    tombstones = tombstones_key(settings.app_id)

    async def record_forget(user_id: str) -> None:
        """Leave a forget tombstone in Redis before the command is acknowledged, so that no
        restore (of an older checkpoint, or one another worker wrote) brings the listener
        back. Retried while Redis is unreachable (the control agent waits; plays do not)."""
        delay = 0.1
        while True:
            writer = worker.writer
            if writer is not None:
                try:
                    await add_tombstone(writer.client, tombstones, user_id,
                                        int(time.time() * 1000), settings.forget_tombstone_ttl_s)
                    return
                except Exception as exc:  # noqa: BLE001 - Redis down: retry, bounded delay
                    m.redis_errors.labels("tombstone").inc()
                    logger.warning("could not record a forget tombstone (%s: %s); retrying",
                                   type(exc).__name__, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.redis_retry_max_s)

    from stream.processing.control import ControlGate

    control_gate = ControlGate(
        ring, insecure=settings.worker_insecure, max_age_ms=settings.control_max_age_s * 1000
    )
    control_log = RateLimitedLog(logging.getLogger("stream.control"), level=logging.WARNING)
    m.init_topic(settings.control_topic, ())
    #: (partition, consumer generation) whose recent nonces the gate has read back
    nonces_loaded: set[tuple[int, int]] = set()

    async def load_recent_nonces(msg: Any) -> None:
        """Before the first command of a partition this process (re)took, read that
        partition's last two windows back and remember their nonces: a replay right after
        a restart or a rebalance is refused as well (stream.processing.control.ControlGate)."""
        from stream.adapters.kafka import read_partition_since

        nonces_loaded.add((msg.partition, msg.generation_id))
        now = int(time.time() * 1000)
        try:
            records = await read_partition_since(
                settings, msg.topic, msg.partition, now - 2 * control_gate.max_age_ms, msg.offset
            )
        except Exception as exc:  # noqa: BLE001 - Kafka trouble: admit on memory alone
            logger.warning("could not read back %s[%d] for control nonces: %r",
                           msg.topic, msg.partition, exc)
            return
        learned = sum(
            control_gate.learn(r.topic, r.partition, r.offset, r.key, r.value, r.headers, now)
            for r in records
        )
        logger.info("control %s[%d]: %d recent nonce(s) read back", msg.topic, msg.partition,
                    learned)

    @app.agent(control, name="control")
    async def process_control(stream: faust.StreamT[bytes]) -> None:
        """Deletion requests: co-partitioned with plays, so this worker owns the user.
        Only authentic, fresh, first-seen commands keyed by their user are applied
        (stream.processing.control.ControlGate); the rest go to the dead-letter topic."""
        async for event in stream.events():
            msg = event.message
            if (msg.partition, msg.generation_id) not in nonces_loaded:
                await load_recent_nonces(msg)
            cmd = control_gate.admit(
                msg.topic,
                msg.partition,
                msg.offset,
                msg.key,
                msg.value,
                msg.headers,
                int(msg.timestamp * 1000) if msg.timestamp else None,
                msg.timestamp_type == LOG_APPEND_TIME,
                int(time.time() * 1000),
            )
            if isinstance(cmd, Rejection):
                control_log.log(
                    cmd.reason,
                    "refused control message at %s[%d]@%d: %s: %s",
                    msg.topic, msg.partition, msg.offset, cmd.reason,
                    escape_text(cmd.detail, 300),
                )
                m.control.labels("rejected").inc()
                record = Record(msg.topic, msg.partition, msg.offset, msg.key, msg.value,
                                int(msg.timestamp * 1000) if msg.timestamp else None)
                await dlq.send(key=msg.key, value=msg.value or b"",
                               headers=DeadLetter(record, cmd).headers())
                m.dlq_writes.labels(msg.topic).inc()
                m.rejected.labels(msg.topic, cmd.reason).inc()
                continue
            existed = processor.forget_user(cmd.user_id)
            await record_forget(cmd.user_id)
            key = processor.redis_key(cmd.user_id)
            if worker.writer is not None:
                worker.writer.forget(key)
            else:
                pending_forgets.append(key)
            m.control.labels("forgotten" if existed else "forgotten_unknown").inc()
            # the request id identifies the deletion; the user id is not logged (privacy)
            logger.info("forgot user (request %s, state existed: %s)",
                        escape_text(cmd.request_id, 128), existed)

    # per-event metrics: resolve the labelled children once (labels() takes a lock and
    # builds a key on every call)
    outcome_counters = {o: m.events.labels(topic, o) for o in OUTCOMES}
    stage_children: dict[str, Any] = {}

    def stage_histogram(stage: str) -> Any:
        child = stage_children.get(stage)
        if child is None:
            child = stage_children[stage] = m.stage.labels(stage)
        return child

    processing_histogram = m.processing

    @app.agent(plays, name="process-plays")
    async def process_plays(stream: faust.StreamT[bytes]) -> None:
        assert isinstance(stream, BatchingStream)  # App(Stream=BatchingStream)
        timing = {"yield": time.perf_counter(), "changelog": time.perf_counter()}
        changelog_failures = [0]
        nothing_buffered = stream.buffer_empty
        plays_buffer[:] = [nothing_buffered]
        set_current_event = stream.set_current_event
        ack_processed = stream.ack_processed

        def fetched_behind(msg: Any) -> int:
            """How many records this partition has after ``msg`` (the fetched highwater)."""
            try:
                highwater = app.consumer.highwater(msg.tp)
            except Exception:  # noqa: BLE001 - e.g. no longer assigned (a rebalance)
                return 0
            return 0 if highwater is None else max(0, highwater - msg.offset - 1)

        take_buffered = stream.take_buffered
        max_batch = settings.agent_batch
        backlog_wait = settings.agent_batch_ms / 1000.0
        live_wait = min(backlog_wait, LIVE_GATHER_S)
        # Acked below, once processed: a buffered play must not be committed before it is
        # applied (Faust acks an event when the iteration moves on to the next one).
        stream.manual_acks()

        async def apply(events: list[Any]) -> None:
            """Apply a gathered batch, then ack each play (see the loop below)."""
            generation = app.consumer_generation_id
            records: list[Record] = []
            live: list[Any] = []
            for ev in events:
                msg = ev.message
                if msg.generation_id != generation:
                    # a rebalance happened while these were buffered: drop them as Faust
                    # drops a stale generation's messages (the new owner reads them again)
                    ack_processed(ev)
                    continue
                live.append(ev)
                records.append(
                    Record(
                        topic=msg.topic,
                        partition=msg.partition,
                        offset=msg.offset,
                        key=msg.key,
                        value=msg.value,
                        timestamp_ms=int(msg.timestamp * 1000) if msg.timestamp else None,
                    )
                )
            started = time.perf_counter()
            if not processor.pending_rank:
                catch_up[1] = started
            # the backlog behind this batch, per partition (the fetched highwater)
            last: dict[Any, Any] = {ev.message.tp: ev.message for ev in live}
            catch_up[0] = any(fetched_behind(msg) >= CATCH_UP_PLAYS for msg in last.values())
            if catch_up[0]:
                m.catch_up_batches.inc()
            stage_totals: dict[str, float] = {}
            outcomes = processor.process_batch(
                records, stage_totals, lambda i, live=live: set_current_event(live[i])
            )
            n = len(records)
            per_event, stage_shares = 0.0, []
            if n:
                per_event = (time.perf_counter() - started) / n
                # stage histograms observe each play's share of its batch's stage time
                stage_shares = [(stage_histogram(stage), seconds / n)
                                for stage, seconds in stage_totals.items()]
            while pending_forgets and worker.writer is not None:
                worker.writer.forget(pending_forgets.popleft())
            while pending_writes and worker.writer is not None:
                worker.writer.submit(pending_writes.popleft())
            while dead_letters:
                dl = dead_letters.popleft()
                await dlq.send(
                    key=dl.record.key, value=dl.record.value or b"", headers=dl.headers()
                )
                m.dlq_writes.labels(topic).inc()
                m.rejected.labels(topic, dl.rejection.reason).inc()
            if processor.evicted_tracks:
                m.tracks_evicted.inc(processor.evicted_tracks)
                processor.evicted_tracks = 0
            monotonic = time.monotonic()
            if live:
                for child, seconds in stage_shares:
                    child.observe_many(seconds, len(live))
                processing_histogram.observe_many(per_event, len(live))
            for ev, outcome in zip(live, outcomes, strict=True):
                outcome_counters[outcome.outcome].inc()
                if outcome.model_error is not None:
                    m.model_errors.inc()
                if outcome.event is not None:
                    m.last_event_ts.set(outcome.event.ts_ms / 1000.0)
                    if outcome.update is not None:
                        m.observe_session(outcome.update, outcome.event.context)
                msg = ev.message
                worker.processed_offsets[msg.tp] = msg.offset
                if (
                    outcome.outcome == "processed"
                    and outcome.update is not None
                    and outcome.event is not None
                    and outcome.model_error is None
                ):
                    # tell the other workers what this play teaches about tracks
                    # (batched: one record per SIGNALS_SEND_S at most, see flush_signals)
                    pending_signals.append(signal_from(worker_id, outcome.update, outcome.event))
                # processed (its state is in the table, its changelog record is dirty and a
                # commit sends that first): now its offset may be committed
                ack_processed(ev)
            set_current_event(None)
            stall_watch.progress(monotonic)
            if processor.eviction_due:
                await evict_off_loop()
            if worker.writer is not None and processor.pending_rank:
                worker.writer.wake()
            now = time.perf_counter()
            if sessions.dirty and (
                now - timing["changelog"] > CHANGELOG_SEND_S or sessions.dirty >= CHANGELOG_BATCH
            ):
                timing["changelog"] = now
                try:
                    await sessions.send_dirty()
                except Exception as exc:  # noqa: BLE001 - kept dirty; the commit retries
                    changelog_failures[0] += 1
                    if changelog_failures[0] in (1, 10) or changelog_failures[0] % 1000 == 0:
                        logger.warning("session changelog send failed %d time(s), kept "
                                       "pending (the commit retries): %r",
                                       changelog_failures[0], exc)
            # Under a backlog the stream hands over buffered events without suspending; give
            # the Redis writer (ranking + flush) a turn every few ms so freshness stays bounded.
            if now - timing["yield"] > 0.004:
                timing["yield"] = now
                await asyncio.sleep(0)

        batch: list[Any] = []
        batch_started = 0.0
        loop = asyncio.get_running_loop()
        wake_handle: list[asyncio.TimerHandle | None] = [None]

        def wake() -> None:
            """A held batch must never wait for a play that will not come: Faust skips the
            buffered messages while its flow control is off (a rebalance, shutdown), and
            then waits for every tracked play to be acked. Until the batch is applied, put
            a wake-up in the stream buffer every few ms; the loop applies the batch on it."""
            wake_handle[0] = None
            if batch:
                stream.wake(_WAKE)
                wake_handle[0] = loop.call_later(WAKE_S, wake)

        def release() -> list[Any]:
            events = batch[:]
            batch.clear()
            handle, wake_handle[0] = wake_handle[0], None
            if handle is not None:
                handle.cancel()
            return events

        try:
            async for value in stream:
                event = stream.current_event
                if event is None:  # a wake-up (or any value that is not a Kafka record)
                    if value is not _WAKE:
                        logger.warning("plays agent ignored a non-record value %r", value)
                    if batch:
                        await apply(release())
                    continue
                now = time.perf_counter()
                if not batch:
                    batch_started = now
                batch.append(event)
                take_buffered(batch, max_batch)
                # Take what Faust has already fetched, never waiting on the network: a lone
                # play is processed at once; otherwise up to `agent_batch` plays go through
                # each stage together (Processor.process_batch: the stages stay in the CPU
                # caches), gathered for at most LIVE_GATHER_S, or `agent_batch_ms` when a
                # backlog waits (BACKLOG_PLAYS: freshness is queueing then).
                if len(batch) < max_batch:
                    behind = fetched_behind(batch[-1].message)
                    window = backlog_wait if behind >= BACKLOG_PLAYS else live_wait
                    if now - batch_started < window and (behind or not nothing_buffered()):
                        # a fetch response lands in the buffer at once (stream.faustx.delivery;
                        # Faust's own loop hands over one message per few turns of the
                        # event loop): give the fetcher a few turns before applying
                        for _ in range(HANDOVER_TURNS):
                            if not nothing_buffered():
                                break
                            await asyncio.sleep(0)
                        if not nothing_buffered():
                            if wake_handle[0] is None:
                                wake_handle[0] = loop.call_later(window + WAKE_S, wake)
                            continue
                await apply(release())
        finally:
            if batch:  # the stream stopped with plays gathered: apply them (and ack)
                await apply(release())


    #: one checkpoint at a time: a periodic one skips while another runs, the final one
    #: waits for it (so the newer snapshot is the one left in Redis)
    checkpoint_lock = asyncio.Lock()

    checkpoint_keys = settings_keys(settings)
    checkpoints_on = checkpoint_mode(settings) in ("signed", "insecure")

    def checkpoint_blob() -> bytes:
        # in the snapshot child: the time is the instant the state was forked
        return seal_models(recommender, keys=checkpoint_keys, app_id=settings.app_id,
                           created_ms=int(time.time() * 1000))

    async def write_checkpoint(in_child: bool = True) -> None:
        """Snapshot the models to Redis (key model:{app_id}); failures are retried next time.
        The snapshot is built in a forked child (stream.worker.snapshot: the event loop pays only
        for the fork) unless ``in_child`` is off (the final one at a stop) or there is no
        fork() here."""
        if not checkpoints_on or worker.writer is None or (
            in_child and checkpoint_lock.locked()
        ):
            return
        async with checkpoint_lock:
            await models_free()  # never snapshot models an eviction is changing
            await _write_checkpoint(in_child)

    async def _write_checkpoint(in_child: bool) -> None:
        assert worker.writer is not None
        started = time.perf_counter()
        try:
            if in_child and can_fork():
                blob, paused = await build_in_child(
                    checkpoint_blob, timeout_s=CHECKPOINT_CHILD_TIMEOUT_S
                )
            else:
                blob = checkpoint_blob()
                paused = time.perf_counter() - started
            m.checkpoint_pause_seconds.observe(paused)
            await save_checkpoint(worker.writer.client, checkpoint_key(settings.app_id), blob)
        except Exception as exc:  # noqa: BLE001 - Redis down etc.: keep serving, retry later
            m.checkpoints.labels("error").inc()
            logger.warning("model checkpoint failed: %s: %s", type(exc).__name__, exc)
            return
        m.checkpoints.labels("written").inc()
        m.checkpoint_seconds.observe(time.perf_counter() - started)
        m.checkpoint_bytes.set(len(blob))

    if checkpoints_on:

        @app.timer(interval=settings.checkpoint_interval_s)
        async def checkpoint_models() -> None:
            await write_checkpoint()

    lag_client: list[Any] = [None]

    similar_refreshed = [0.0]

    @app.timer(interval=0.1)
    async def refresh_similar() -> None:
        """Ten times a second, refresh a few "more like this" lists of recently played
        tracks (each at most every similar_refresh_s), whether or not plays are arriving.
        At most 2.5 ms per tick (2.5 % of a core; a list costs ~0.3 ms at 12k tracks now
        that the factor norms are computed once per tick, ~0.8 ms before), so the event
        loop is never held long enough to show in the freshness p99."""
        flush_signals()
        if worker.writer is None or not processor.touched_tracks or models_busy():
            return
        now = time.time()
        # plays waiting in the stream buffer come first: then refresh once a second only
        waiting = plays_buffer and not plays_buffer[0]()
        if waiting and now - similar_refreshed[0] < SIMILAR_BACKLOG_S:
            return
        similar_refreshed[0] = now
        for key, doc in processor.similar_due(now, limit=20, budget_s=0.0025):
            worker.writer.submit_plain(key, doc)

    async def flush_catalog_counts() -> None:
        """Every catalog_flush_s: each track's plays since the last time (one HINCRBY and
        last_seen per track, not a write per play)."""
        write_catalog(counts=True)

    async def resolve_names() -> None:
        """Once a second, read back from the Redis catalogue the names of up to 256
        tracks a document wanted and this worker has not seen named (tracks played on
        other workers' partitions, names loaded with ``stream catalog load``, names seen
        before a restart): later documents carry them."""
        wanted = processor.catalog.take_wanted(256)
        if not wanted or worker.writer is None:
            return
        try:
            found = await read_track_names(worker.writer.client, settings.catalog_prefix, wanted)
        except Exception as exc:  # noqa: BLE001 - names are cosmetic: try again later
            m.redis_errors.labels("catalog").inc()
            logger.warning("could not read track names from Redis: %s", exc)
            return
        for track in wanted:
            name, artist, album = found.get(track, (None, None, None))
            processor.catalog.learn(track, TrackInfo(name, artist, album))

    async def refresh_short_lists() -> None:
        """Re-rank (bounded) the listeners whose list came out short, once the catalogue
        has grown since (their next play would otherwise be the next time)."""
        if processor.refresh_short_lists() and worker.writer is not None:
            worker.writer.wake()

    app.timer(interval=settings.catalog_flush_s)(flush_catalog_counts)
    app.timer(interval=1.0)(resolve_names)
    if settings.short_refresh_s:
        app.timer(interval=settings.short_refresh_s)(refresh_short_lists)

    @app.timer(interval=2.0)
    async def report_state() -> None:
        consumer = app.consumer
        assigned = [tp for tp in consumer.assignment() if tp.topic == topic]
        m.assigned.labels(topic).set(len(assigned))
        reported: set[str] = set()
        # End offsets from the broker through our own small client: the fetcher's highwater
        # lags behind under a backlog, and Faust's consumer is not asked (with
        # kafka_consumer_thread it lives in another thread, where a cancelled cross-thread
        # call could wedge it; on the event loop, a slow answer would hold up its fetches).
        ends: dict[Any, Any] = {tp: consumer.highwater(tp) for tp in assigned}
        if assigned:
            try:
                if lag_client[0] is None:
                    from aiokafka import AIOKafkaConsumer

                    from stream.adapters.kafka import client_kwargs

                    client = AIOKafkaConsumer(**client_kwargs(settings), enable_auto_commit=False)
                    await asyncio.wait_for(client.start(), 5.0)
                    lag_client[0] = client
                broker_ends = await asyncio.wait_for(lag_client[0].end_offsets(assigned), 2.0)
                ends.update(broker_ends)
            except Exception as exc:  # noqa: BLE001 - keep the fetch view; retry next tick
                logger.debug("end offsets for lag unavailable: %r", exc)
        waiting = 0
        for tp in assigned:
            end = ends.get(tp)
            done = worker.processed_offsets.get(tp)
            if end is None:
                continue
            committed = done + 1 if done is not None else 0
            m.lag.labels(tp.topic, str(tp.partition)).set(max(0, end - committed))
            reported.add(str(tp.partition))
            waiting += max(0, end - committed)
        if getattr(app, "in_recovery", False):
            waiting = 0  # restoring tables: not a stall (the clock restarts afterwards)
        if stall_watch.check(time.monotonic(), waiting):
            m.stalls.inc()
        for stale in lag_partitions - reported:  # revoked: its new owner reports it now
            m.lag.remove(topic, stale)
        lag_partitions.clear()
        lag_partitions.update(reported)
        m.active_users.set(sessions.approx_len())
        m.catalogue.set(
            recommender.catalogue_size() if hasattr(recommender, "catalogue_size") else 0
        )
        if worker.writer is not None:
            m.redis_pending.set(len(worker.writer.pending))
        processor.reject_log.flush()
        signal_log.flush()
        control_log.flush()
        report_ticks[0] += 1
        if settings.gc_freeze_interval_s and (
            time.monotonic() - gc_frozen_at[0] >= settings.gc_freeze_interval_s
        ):
            gc_frozen_at[0] = time.monotonic()
            m.gc_freeze_seconds.observe(freeze_survivors())
        mf = getattr(recommender, "mf", None)
        users_evicted = getattr(mf, "users_evicted", 0)
        if users_evicted > users_evicted_seen[0]:
            m.mf_users_evicted.inc(users_evicted - users_evicted_seen[0])
        users_evicted_seen[0] = users_evicted
        if report_ticks[0] % 8 == 1 and not models_busy():  # sampled deep size
            m.set_model_memory(model_memory_bytes(recommender))
        export_quality()

    report_ticks = [0]
    gc_frozen_at = [time.monotonic()]
    users_evicted_seen = [0]
    lag_partitions: set[str] = set()

    drift_seen = [0]

    def export_quality() -> None:
        """Export ``worker.evaluator``'s windowed summary (HR@10 / NDCG@10 per variant, skip
        accuracy) and the recommender's drift detections. Until something sets
        ``worker.evaluator`` (and feeds it test-then-train), the quality gauges stay absent."""
        detector = getattr(recommender, "drift", None)
        detections = getattr(detector, "n_detections", None)
        if isinstance(detections, int):
            m.drift.labels("skip_rate").inc(max(0, detections - drift_seen[0]))
            drift_seen[0] = detections
        evaluator = worker.evaluator
        if evaluator is None or getattr(evaluator, "k", None) != 10:
            return
        for variant, stats in evaluator.summary().items():
            if variant == "skip":
                m.skip_accuracy.labels("skip").set(stats["accuracy"])
            else:
                m.set_quality(
                    variant,
                    hr_at_10=stats["hr@10"],
                    ndcg_at_10=stats["ndcg@10"],
                    window_events=int(stats["events"]),
                )

    @app.on_rebalance_complete.connect
    async def on_rebalance(sender: Any, **kwargs: Any) -> None:  # pragma: no cover - signal
        m.rebalances.inc()

    return worker


def freeze_startup_heap() -> int:
    """Collect, then move every object alive now (modules, Faust, numba, the warmed-up
    kernels, restored models) out of the cyclic garbage collector's reach; returns how
    many. Python's full (generation 2) collections otherwise walk all of them again every
    few seconds: fed at 1,000 events/s each one held the event loop ~120-160 ms, the
    freshness p99. After the freeze they took 7-11 ms (docs/benchmarks.md, session 6).
    Objects created later (listener state, models' growth) are collected as before."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def freeze_survivors() -> float:
    """Collect the young generations (cheap: only objects created since the last
    collection of them), then freeze every object alive (O(1): the generations' lists are
    moved, not walked). Returns the seconds it took. (It does not count the frozen objects:
    ``gc.get_freeze_count()`` walks them all -- ~0.7 s at a million listeners.)

    Why: the state of every listener ever seen (the session table) is long-lived and its
    objects are tracked by the cyclic collector, so a full collection walks all of them --
    0.4 s at 100k listeners, seconds at a million, on the event loop. Frozen objects are
    still freed by reference counting when dropped (a forgotten or expired listener); only
    a reference *cycle* that dies after being frozen is never reclaimed, and the worker's
    long-lived objects do not form such cycles in steady state. The junk-ids drill measures
    the effect on RSS and stalls (docs/benchmarks.md, "Memory under hostile ids")."""
    started = time.perf_counter()
    gc.collect(1)
    gc.freeze()
    return time.perf_counter() - started


def run_worker(worker: Worker) -> None:
    """Run until SIGTERM/SIGINT (Faust handles the signals and shuts down cleanly)."""
    faust_worker = faust.Worker(
        worker.app,
        loglevel=worker.settings.log_level.upper(),
        quiet=True,
        redirect_stdouts=False,
    )
    # Faust's terminal spinner (kept at log levels >= WARNING) sets the root logger to DEBUG
    # and handles every record: aiokafka's per-message debug logs then cost the hot path
    # ~2 % of the worker's CPU even though nothing is printed.
    faust_worker.spinner = None
    logger.info("%d start-up objects frozen out of the garbage collector's scans",
                freeze_startup_heap())
    shutdown.install(faust_worker, worker.app, worker.settings.shutdown_timeout_s)
    faust_worker.execute_from_commandline()
