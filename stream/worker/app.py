"""The Faust app, composed of named parts. A play's way through the worker:

``PlaysAgent`` (:mod:`stream.worker.plays`: batches from Faust's stream) ->
``Processor`` (:mod:`stream.processing.pipeline`: validate, session state, learn, queue the
ranking) -> ``Ranker`` (:mod:`stream.worker.ranker`: ranks the pending listeners, paced by
the pipeline) -> ``WriterPart`` (:mod:`stream.worker.writer`: the batched Redis writer).

Beside it: the control agent (:mod:`stream.worker.control_agent`: forgets), track signals
between workers (:mod:`stream.worker.signals`), the checkpointer
(:mod:`stream.worker.checkpointer`), the timers (:mod:`stream.worker.timers`), the metrics
glue (:mod:`stream.worker.telemetry`), and the start-up and shutdown order
(:mod:`stream.worker.lifecycle`). :func:`create_worker` only composes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, cast

import faust
from faust.types import TP

from stream.adapters.metrics import Metrics
from stream.config import Settings
from stream.core.evaluation import Prequential
from stream.core.recommender import Recommender
from stream.faustx.changelog_table import BatchedChangelogTable
from stream.faustx.consumer import consume_in_loop
from stream.faustx.delivery import fast_delivery
from stream.processing.pacing import RankPacing
from stream.processing.pipeline import Processor
from stream.worker.catalog_sync import CatalogSync
from stream.worker.checkpointer import Checkpointer
from stream.worker.control_agent import ControlAgent
from stream.worker.deadletters import DeadLetters
from stream.worker.eviction import ModelGuard
from stream.worker.heap import freeze_startup_heap
from stream.worker.lag import ConsumerLag
from stream.worker.lifecycle import Lifecycle, Parts
from stream.worker.plays import PlaysAgent
from stream.worker.ranker import Ranker
from stream.worker.signals import SignalPublisher, SignalReader, worker_keys
from stream.worker.telemetry import Telemetry
from stream.worker.timers import Timers
from stream.worker.topics import declare_topics
from stream.worker.watchdog import LoopLagProbe, StallWatch
from stream.worker.writer import WriterPart

logger = logging.getLogger(__name__)


@dataclass
class Worker:
    """Everything a running worker holds, handy for tests and the CLI."""

    app: faust.App
    settings: Settings
    metrics: Metrics
    recommender: Recommender
    writer: WriterPart | None = None
    processed_offsets: dict[TP, int] = field(default_factory=dict)
    #: The live prequential evaluator (a windowed ``stream.core.evaluation.Prequential``); the
    #: report timer exports its summary as the quality metrics.
    evaluator: Any = None


def configure_recommender(recommender: Recommender | None, settings: Settings) -> Recommender:
    """A fresh recommender, or the restored one, set up for these settings (ranker, the
    listener cap)."""
    if recommender is None:
        recommender = Recommender(blend=settings.ranker,
                                  session_models=settings.ranker == "learned")
    if isinstance(recommender, Recommender):  # also one restored from a checkpoint
        recommender.use_ranker(settings.ranker)
        logger.info("ranker: %s (setting ranker; session models %s)", settings.ranker,
                    "on" if recommender.session_models else "off")
    limit_users = getattr(recommender, "limit_users", None)
    if callable(limit_users):  # also bounds a recommender restored from a checkpoint
        limit_users(settings.max_users or None)
    return recommender



def broker_url(settings: Settings) -> str:
    return ";".join(f"kafka://{h.strip()}" for h in settings.kafka_bootstrap.split(","))


def broker_credentials(settings: Settings) -> Any:
    proto = settings.kafka_security_protocol
    if proto == "PLAINTEXT":
        return None
    ssl_context = None
    if proto in ("SSL", "SASL_SSL"):
        import ssl

        ssl_context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
    if proto.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password,
            ssl_context=ssl_context,
            mechanism=settings.kafka_sasl_mechanism,
        )
    return faust.SSLCredentials(ssl_context)



#: how long the commit flush waits for a changelog hand-over that makes no progress
STALLED_HANDOVER_S = 10.0
#: a checkpoint's snapshot child is killed (and the checkpoint counted as an error) after this
CHECKPOINT_CHILD_TIMEOUT_S = 120.0


def make_commit_wait_for_changelog(
    producer: Any, batched: list[BatchedChangelogTable] | None = None
) -> None:
    """Make Faust's pre-commit ``producer.flush()`` really wait for the buffered records.

    With ``at_least_once`` Faust fixes the offsets to commit, flushes its producer (table
    changelog records included) and then commits. But ``ProducerBuffer.flush`` gives up as
    soon as no record has been handed to aiokafka for 0.1 s (``flush_atmost`` returns on
    its ``wait_for`` timeout), and ``buffer.size`` does not count the record that
    ``_handle_pending`` is handing over at that moment. On a loaded machine, or while the
    producer is still fetching metadata after a restart, offsets were committed ahead of
    changelog records that had not reached Kafka; a SIGKILL then lost those plays from the
    listener's state (the likely cause of one CI crash-loop run reporting ``lost 161``).

    The wrapped flush waits until every record *enqueued before it started* has been
    handed to aiokafka (the buffer is FIFO: a count of hand-overs is enough), then waits
    for aiokafka's batches. Records enqueued later belong to events after
    the commit point and are not waited for: waiting for an empty buffer instead stalled
    the agent (Faust commits inline every ``broker_commit_every`` events) for ~1.3 s at
    200 events/s. If a record cannot be handed over, or the buffer stops or crashes with
    records pending, the flush raises, so Faust does not commit: those events are
    redelivered. (A record aiokafka accepted but then failed to deliver, e.g. too large,
    is only logged by Faust, as before; aiokafka's flush does not report it.)

    The tables in ``batched`` (filled in later, once they exist) send their pending
    changelog records (:meth:`BatchedChangelogTable.send_dirty`) after that hand-over and
    before the producer flush, and a record of theirs that failed to deliver fails the
    flush (:meth:`BatchedChangelogTable.wait_delivered`).
    """
    batched_tables = batched if batched is not None else []
    if producer.app.conf.producer_threaded:  # put() would bypass _send_pending
        raise ValueError("make_commit_wait_for_changelog needs producer_threaded=False")
    buffer = producer.buffer
    counts = {"enqueued": 0, "handed_over": 0}
    failures: list[BaseException] = []
    put = buffer.put
    send_pending = buffer._send_pending
    handed_over = asyncio.Event()

    def counted_put(fut: Any) -> None:
        put(fut)
        counts["enqueued"] += 1

    async def counted_send(fut: Any) -> None:
        try:
            await send_pending(fut)
        except BaseException as exc:
            # not handed over: a commit waiting for it must fail, not go ahead (Faust's
            # _handle_pending task dies with this exception, so nothing more is sent)
            failures.append(exc)
            handed_over.set()
            raise
        counts["handed_over"] += 1
        handed_over.set()

    # Producer.send_soon calls buffer.put, and _handle_pending looks _send_pending up when
    # the buffer starts (after this): instance attributes take precedence
    buffer.put = counted_put
    buffer._send_pending = counted_send

    async def flush() -> None:
        target = counts["enqueued"]
        progress, last_change = counts["handed_over"], time.monotonic()
        while counts["handed_over"] < target:
            if counts["handed_over"] != progress:
                progress, last_change = counts["handed_over"], time.monotonic()
            elif time.monotonic() - last_change > STALLED_HANDOVER_S:
                # aiokafka has accepted nothing for that long (a send stuck on metadata or
                # a full accumulator): stop holding the commit -- and with it the agent,
                # which commits inline -- and fall back to Faust's own behaviour, loudly
                logger.warning(
                    "changelog producer accepted nothing for %.0f s with %d record(s) "
                    "pending; committing without waiting for them",
                    STALLED_HANDOVER_S, target - counts["handed_over"],
                )
                break
            if failures:
                raise RuntimeError(
                    f"a changelog record could not be handed to Kafka ({failures[-1]!r}); "
                    "not committing offsets past it"
                )
            if buffer.crashed or buffer.state != "running":
                raise RuntimeError(
                    f"producer buffer is {buffer.state}, "
                    f"{target - counts['handed_over']} record(s) not handed to Kafka; "
                    "not committing offsets past them"
                )
            handed_over.clear()
            if counts["handed_over"] >= target:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(handed_over.wait(), 1.0)
        # then what Faust's aiokafka Producer.flush does after its buffer flush (which
        # itself waits for an empty buffer, i.e. stalls under steady load): aiokafka's
        # flush, which waits for the batches accumulated so far to be acknowledged
        for table in batched_tables:
            await table.send_dirty()  # waits for an agent hand-over in progress, too
        commit_futures = [table.handed_over() for table in batched_tables]
        kafka = getattr(producer, "_producer", None)
        if kafka is not None:
            accumulator = getattr(kafka, "_message_accumulator", None)
            if accumulator is not None and hasattr(accumulator, "flush_for_commit"):
                # close the batches still lingering (producer_linger) so they go out now
                # instead of after the linger: the agent commits inline and waits here
                await accumulator.flush_for_commit()
            else:
                await kafka.flush()
        for transactional in getattr(producer, "_transaction_producers", {}).values():
            await transactional.flush()
        for table, futures in zip(batched_tables, commit_futures, strict=True):
            await table.wait_delivered(futures)

    producer.flush = flush


def limit_fetch_wait(app: faust.App, max_wait_ms: int, min_bytes: int = 1) -> None:
    """Have the app's Kafka consumer ask the broker to hold a fetch at most
    ``max_wait_ms`` when it has no data (Faust hard-codes aiokafka's ``fetch_max_wait_ms``
    to 1,500 ms).

    Fed live at 700-1,000 events/s, the worker now and then received nothing for ~1.5 s
    although records kept arriving, and at that load it never caught up again (P2 runs:
    the processed rate fell to ~200/s for about 1.5 s, with no event-loop block or slow
    commit logged). With 100 ms the stalls were gone in every run (docs/benchmarks.md,
    session 6). Which fetch the broker held, and why, is not pinned down. The price is at
    most 10 empty fetches a second per idle consumer."""
    thread = getattr(app.consumer, "_thread", None)
    create = getattr(thread, "_create_worker_consumer", None)
    if create is None:  # not Faust's aiokafka driver: leave it
        logger.warning("cannot set the consumer's fetch wait (no aiokafka consumer thread)")
        return

    def create_worker_consumer(transport: Any) -> Any:
        consumer = create(transport)
        if not hasattr(consumer, "_fetch_max_wait_ms"):
            logger.warning("aiokafka consumer has no _fetch_max_wait_ms: fetch wait left as is")
        consumer._fetch_max_wait_ms = max_wait_ms  # read by AIOKafkaConsumer.start()
        consumer._fetch_min_bytes = min_bytes
        return consumer

    thread._create_worker_consumer = create_worker_consumer


def resume_after_seek(app: faust.App, topic: str) -> None:
    """Let ``topic``'s partitions deliver records only once Faust has sought them to their
    committed offsets (faust-streaming 0.15 resumes them *before* awaiting that seek).

    In the gap, aiokafka's fetch position can be ahead of the committed offset (Faust's
    ``getmany`` discards the rest of a fetched batch when flow stops, after aiokafka's
    position moved past it), so the restarted worker applied offsets 183-188 of a
    partition, the seek then rewound it to 34, and the per-listener offset guard dropped
    34-182 as replays (the crash-loop loss, docs/reliability.md). The partitions are
    resumed once the seek has run *and* Faust has resumed flow (which clears its stream
    buffers), so every record the stream sees comes from a position the seek set: Faust
    pauses partitions in its own fetch filter, so nothing fetched before can pass, and
    aiokafka's seek drops what it had buffered.
    """
    consumer = app.consumer
    held: set[TP] = set()
    sought = [False]
    resume = consumer.resume_partitions
    pause = consumer.pause_partitions
    perform_seek = consumer.perform_seek
    resume_flow = app.flow_control.resume

    def release() -> None:
        sought[0] = False
        if held:
            tps = set(held)
            held.clear()
            resume(tps)

    def resume_partitions(tps: Any) -> None:
        tps = set(tps)
        streams = {tp for tp in tps if tp.topic == topic}
        held.update(streams)
        if tps - streams:
            resume(tps - streams)

    def pause_partitions(tps: Any) -> None:
        tps = set(tps)
        held.difference_update(tps)
        pause(tps)

    async def seek_then_resume() -> None:
        try:
            await perform_seek()
        except BaseException:
            release()  # a partition held forever would stall the stream
            raise
        sought[0] = True

    def flow_resumed() -> None:
        resume_flow()  # clears the stream buffers (records from before the seek)
        if sought[0]:
            release()  # only now: nothing fetched after the seek can be cleared away

    consumer.resume_partitions = resume_partitions  # type: ignore[method-assign]
    consumer.pause_partitions = pause_partitions  # type: ignore[method-assign]
    consumer.perform_seek = seek_then_resume  # type: ignore[method-assign]
    app.flow_control.resume = flow_resumed  # type: ignore[method-assign]


def build_app(settings: Settings, partitions: int) -> tuple[faust.App, list[BatchedChangelogTable]]:
    """The Faust app for these settings, with the Faust/aiokafka adaptations installed;
    also the list the commit flush reads its batched tables from (filled in later)."""
    app = faust.App(
        settings.app_id,
        broker=broker_url(settings),
        broker_credentials=broker_credentials(settings),
        store=settings.table_store,
        datadir=settings.data_dir or None,
        topic_partitions=partitions,
        topic_replication_factor=settings.replication_factor,
        producer_acks=-1 if settings.kafka_acks == "all" else int(settings.kafka_acks),
        processing_guarantee="at_least_once",
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        autodiscover=False,
        version=1,
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=4096,
        # batch changelog writes: every produce request costs the agent's event loop
        # far more than a record (P1 drain 635 -> 879 events/s going from 5 ms to 50 ms,
        # docs/benchmarks.md). Freshness is unaffected: recommendations go to Redis, not
        # through this producer, and a commit sends the lingering batches at once
        # (make_commit_wait_for_changelog), so the inline commit never waits out the linger.
        producer_linger=0.1,
        producer_max_batch_size=256 * 1024,
        # a crashed worker's partitions move to the others (or its restart) within ~10 s
        # instead of Faust's default 60 s
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
    )
    if not settings.kafka_consumer_thread:
        consume_in_loop(app)  # before anything creates app.consumer
    else:
        logger.info("Kafka consumer: in Faust's consumer thread (kafka_consumer_thread=true)")
    batched_tables: list[BatchedChangelogTable] = []
    make_commit_wait_for_changelog(app.producer, batched_tables)
    resume_after_seek(app, settings.plays_topic)
    limit_fetch_wait(app, settings.kafka_fetch_max_wait_ms, settings.kafka_fetch_min_bytes)
    fast_delivery(app)
    return app, batched_tables


def create_worker(
    settings: Settings,
    metrics: Metrics,
    partitions: int,
    recommender: Recommender | None = None,
) -> Worker:
    """Build the Faust app for these settings, composed of its parts. ``partitions`` is the
    plays topic's count. A play's way: ``PlaysAgent`` -> ``Processor`` (pipeline) ->
    ``Ranker`` -> ``WriterPart`` (Redis); ``Lifecycle`` orders start-up and shutdown."""
    app, batched_tables = build_app(settings, partitions)
    recommender = configure_recommender(recommender, settings)
    telemetry = Telemetry(metrics, settings)
    telemetry.build_info(recommender.model_version, settings.app_id)
    topics = declare_topics(app, settings, partitions)
    batched_tables.append(topics.sessions)
    worker = Worker(app=app, settings=settings, metrics=metrics, recommender=recommender,
                    evaluator=Prequential(k=10, window=settings.quality_window))
    ring = worker_keys(settings)
    worker_id = uuid.uuid4().hex[:12]

    writer = worker.writer = WriterPart(settings, telemetry)
    dead_letters = DeadLetters(topics.dlq, telemetry)
    processor = Processor(
        settings, recommender, topics.sessions, writer.submit, dead_letters.queue,
        evaluator=worker.evaluator, defer_ranking=True, defer_eviction=True,
    )
    signals = SignalPublisher(topics.signals, topics.signals_name, ring, worker_id, settings,
                              telemetry)
    catalog = CatalogSync(settings, processor.catalog, writer, telemetry)
    pacing = RankPacing(settings.catch_up_rank_ms / 1000.0)
    ranker = Ranker(processor, pacing, writer, telemetry, models_busy=lambda: models.busy(),
                    after_ranking=(signals.flush, catalog.write_changes))
    models = ModelGuard(processor, telemetry, on_evicted=ranker.wake)
    checkpointer = Checkpointer(settings, recommender, lambda: writer.client, models.free,
                                telemetry)
    reader = SignalReader(settings, topics.signals_name, ring, worker_id, recommender,
                          models.free, telemetry)
    stall_watch = StallWatch(after_s=settings.stall_warning_s,
                             describe_state=lambda: consumer_state(worker))
    plays = PlaysAgent(
        app, settings, processor, topics.sessions, pacing=pacing, ranker=ranker, models=models,
        dead_letters=dead_letters, signals=signals, telemetry=telemetry,
        stall_watch=stall_watch, processed_offsets=worker.processed_offsets,
    )
    control = ControlAgent(settings, ring, processor, writer, dead_letters, telemetry)
    lag = ConsumerLag(app, settings, worker.processed_offsets, telemetry)
    loop_lag = LoopLagProbe(on_lag=lambda s: telemetry.loop_lag(s, loop_lag.max_lag))
    timers = Timers(
        settings, processor=processor, writer=writer, ranker=ranker, models=models,
        signals=signals, catalog=catalog, checkpointer=checkpointer, lag=lag,
        stall_watch=stall_watch, telemetry=telemetry, sessions=topics.sessions,
        evaluator=worker.evaluator, nothing_buffered=plays.nothing_buffered,
        logs=(processor.reject_log, reader.log, control.log),
    )

    app.agent(topics.plays, name="process-plays")(plays.run)
    app.agent(topics.control, name="control")(control.run)
    timers.install(app)
    # an instance: Faust's App.service takes one too (App._prepare_subservice)
    app.service(cast(Any, Lifecycle(Parts(writer=writer, ranker=ranker, loop_lag=loop_lag,
                                signal_reader=reader, signals=signals,
                                checkpointer=checkpointer, catalog=catalog, models=models,
                                lag=lag))))

    async def on_rebalance(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        telemetry.rebalanced()

    # mode's handler type (mypy_extensions argument kinds) accepts no function as typed
    app.on_rebalance_complete.connect(cast(Any, on_rebalance))
    return worker


def consumer_state(worker: Worker) -> dict[str, Any]:
    """What the stall watch logs about the consumer when the stream stalls."""
    app = worker.app
    consumer = app.consumer
    buffer = app.producer.buffer
    return {
        "assigned": sorted(str(tp) for tp in consumer.assignment()
                           if tp.topic == worker.settings.plays_topic),
        "paused": sorted(str(tp) for tp in getattr(consumer, "_paused_partitions", ())),
        "flow_active": app.flow_control.is_active(),
        "committing": getattr(consumer, "_commit_fut", None) is not None,
        "producer_buffer": getattr(buffer, "size", None),
        "processed_offsets": {str(tp): o for tp, o in worker.processed_offsets.items()},
        "redis_pending": worker.writer.pending() if worker.writer else None,
    }


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
    faust_worker.execute_from_commandline()
