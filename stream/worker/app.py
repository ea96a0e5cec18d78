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

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, cast

from faust.types import TP

from stream.adapters.metrics import Metrics
from stream.config import Settings
from stream.core.evaluation import Prequential
from stream.core.recommender import Recommender
from stream.core.signal_positions import Restored, SignalPositions
from stream.faustx.app import SeamApp, create_app
from stream.processing.pacing import RankPacing
from stream.processing.pipeline import Processor
from stream.worker.catalog_sync import CatalogSync
from stream.worker.checkpointer import Checkpointer
from stream.worker.control_agent import ControlAgent
from stream.worker.deadletters import DeadLetters
from stream.worker.eviction import ModelGuard
from stream.worker.fencing import FreezeFence
from stream.worker.heap import freeze_startup_heap, no_transparent_huge_pages, one_blas_thread
from stream.worker.lag import ConsumerLag
from stream.worker.lifecycle import Lifecycle, Parts
from stream.worker.plays import PlaysAgent
from stream.worker.ranker import Ranker
from stream.worker.replica_sync import is_checkpoint_writer
from stream.worker.sessions_bound import SessionBound
from stream.worker.signals import SignalPublisher, SignalReader, worker_keys
from stream.worker.telemetry import Telemetry
from stream.worker.timers import Timers
from stream.worker.topics import declare_topics
from stream.worker.watchdog import LoopLagProbe, StallSampler, StallWatch, TurnBudget
from stream.worker.writer import WriterPart

logger = logging.getLogger(__name__)

#: the loop's own work (CPU seconds) after which the plays agent's next batch and the
#: ranker's next step wait for a new loop turn (stream.worker.watchdog.TurnBudget)
TURN_BUDGET_S = 0.02


@dataclass
class Worker:
    """Everything a running worker holds, handy for tests and the CLI."""

    app: SeamApp
    settings: Settings
    metrics: Metrics
    recommender: Recommender
    writer: WriterPart | None = None
    processed_offsets: dict[TP, int] = field(default_factory=dict)
    #: The live prequential evaluator (a windowed ``stream.core.evaluation.Prequential``); the
    #: report timer exports its summary as the quality metrics.
    evaluator: Any = None
    #: ends the process after an event-loop freeze past the session (stream.worker.fencing)
    freeze_fence: FreezeFence | None = None


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
    # the reserved rows below are faulted in page by page as tracks arrive: small pages
    no_transparent_huge_pages()
    one_blas_thread()  # the loop's BLAS calls do not wait on spinning BLAS threads
    reserve = getattr(recommender, "reserve_tracks", None)
    if callable(reserve):  # no per-track array is copied to grow up to max_tracks
        reserve(settings.max_tracks)
    limit_users = getattr(recommender, "limit_users", None)
    if callable(limit_users):  # also bounds a recommender restored from a checkpoint
        limit_users(settings.max_users or None)
    return recommender



def create_worker(
    settings: Settings,
    metrics: Metrics,
    partitions: int,
    recommender: Recommender | None = None,
    *,
    restored: Restored | None = None,
) -> Worker:
    """Build the Faust app for these settings, composed of its parts. ``partitions`` is the
    plays topic's count; ``restored``: the signals positions the restored ``recommender``'s
    checkpoint includes (the signal reader replays from them, docs/scaling.md). A play's
    way: ``PlaysAgent`` -> ``Processor`` (pipeline) -> ``Ranker`` -> ``WriterPart`` (Redis);
    ``Lifecycle`` orders start-up and shutdown."""
    app = create_app(settings, partitions)  # the seam: Faust configured and adapted
    recommender = configure_recommender(recommender, settings)
    telemetry = Telemetry(metrics, settings)
    telemetry.build_info(recommender.model_version, settings.app_id)
    topics = declare_topics(app, settings, partitions)
    worker = Worker(app=app, settings=settings, metrics=metrics, recommender=recommender,
                    evaluator=Prequential(k=10, window=settings.quality_window))
    ring = worker_keys(settings)
    worker_id = uuid.uuid4().hex[:12]
    positions = SignalPositions(worker_id, restored)  # where the item state stands in signals

    writer = worker.writer = WriterPart(settings, telemetry)
    dead_letters = DeadLetters(topics.dlq, telemetry)
    processor = Processor(
        settings, recommender, topics.sessions, writer.submit, dead_letters.queue,
        evaluator=worker.evaluator, defer_ranking=True, defer_eviction=True,
        partitions=partitions,
    )
    signals = SignalPublisher(topics.signals, topics.signals_name, ring, worker_id, settings,
                              telemetry)
    # a commit waits for the signals of the plays it commits (docs/scaling.md, "Restart")
    app.before_commit.append(signals.flush_for_commit)
    # the item step of each play is the signal's content: not built when none is sent
    emit_steps = getattr(recommender, "emit_item_steps", None)
    if callable(emit_steps):
        emit_steps(signals.enabled)
    catalog = CatalogSync(settings, processor.catalog, writer, telemetry)
    pacing = RankPacing(settings.catch_up_rank_ms / 1000.0)
    # the loop's own work per turn, shared by the agent's batch and the ranker's steps
    turns = TurnBudget(TURN_BUDGET_S)
    ranker = Ranker(processor, pacing, writer, telemetry, models_busy=lambda: models.busy(),
                    after_ranking=(signals.flush, catalog.write_changes), turns=turns)
    models = ModelGuard(processor, telemetry, on_evicted=ranker.wake)
    checkpointer = Checkpointer(
        settings, recommender, lambda: writer.client, models.free, telemetry,
        positions=positions, is_writer=lambda: is_checkpoint_writer(app, settings.plays_topic))
    reader = SignalReader(settings, topics.signals_name, ring, worker_id, recommender,
                          models.free, telemetry, positions=positions,
                          forget_model_state=processor.forget_model_state)
    freeze_fence = worker.freeze_fence = FreezeFence(
        float(app.conf.broker_session_timeout),  # the effective one (BROKER_SESSION_TIMEOUT)
        holds_partitions=lambda: holds_partitions(app))
    stall_watch = StallWatch(after_s=settings.stall_warning_s,
                             describe_state=lambda: consumer_state(worker))
    plays = PlaysAgent(
        app, settings, processor, topics.sessions, pacing=pacing, ranker=ranker, models=models,
        dead_letters=dead_letters, signals=signals, telemetry=telemetry,
        stall_watch=stall_watch, processed_offsets=worker.processed_offsets,
        sessions_bound=SessionBound(app, settings, processor, topics.sessions, writer,
                                    telemetry) if processor.max_sessions else None,
        freeze_fence=freeze_fence, turns=turns,
    )
    control = ControlAgent(settings, ring, processor, writer, dead_letters, telemetry,
                           partitions=partitions, broadcast_forget=signals.broadcast_forget)
    lag = ConsumerLag(app, settings, worker.processed_offsets, telemetry)
    loop_lag = LoopLagProbe(
        on_lag=lambda s: telemetry.loop_lag(s, loop_lag.max_lag),
        on_busy=lambda s: telemetry.loop_busy(s, loop_lag.max_busy),
        sampler=StallSampler(settings.stall_sample_ms / 1000.0) if settings.stall_sample_ms
        else None,
        fence=freeze_fence, turns=turns,
    )
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


def holds_partitions(app: SeamApp) -> bool:
    """Whether the worker's consumer has partitions assigned (False before it exists)."""
    try:
        return bool(app.seam_consumer.assignment())
    except Exception:  # noqa: BLE001 - not started yet
        return False


def consumer_state(worker: Worker) -> dict[str, Any]:
    """What the stall watch logs about the consumer when the stream stalls."""
    app = worker.app
    consumer = app.seam_consumer
    buffer = app.producer.buffer
    return {
        "assigned": sorted(str(tp) for tp in consumer.assignment()
                           if tp.topic == worker.settings.plays_topic),
        "paused": sorted(str(tp) for tp in consumer.paused_partitions()),
        "flow_active": app.flow_control.is_active(),
        "committing": consumer.committing,
        "producer_buffer": getattr(buffer, "size", None),
        "processed_offsets": {str(tp): o for tp, o in worker.processed_offsets.items()},
        "redis_pending": worker.writer.pending() if worker.writer else None,
    } | consumer.hold_state()


def run_worker(worker: Worker) -> None:
    """Run until SIGTERM/SIGINT (Faust handles the signals and shuts down cleanly)."""
    # the app's Worker class (stream.faustx.shutdown.SeamWorker): a stop bounded by
    # shutdown_timeout_s
    faust_worker = worker.app.worker(
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
    if worker.freeze_fence is not None:
        worker.freeze_fence.install_sigcont(time.monotonic)
    faust_worker.execute_from_commandline()
