"""The worker's Faust app, configured and with every adaptation installed: :func:`create_app`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import faust

from stream.config import Settings
from stream.faustx import shutdown, transport
from stream.faustx.changelog_table import BatchedChangelogTable
from stream.faustx.compat import check_compat
from stream.faustx.consumer import SeamConsumer
from stream.faustx.options import SeamOptions
from stream.faustx.startup import QuickTableManager
from stream.faustx.stream import BatchingStream
from stream.faustx.tablestore import faust_app_options

logger = logging.getLogger(__name__)


class SeamApp(faust.App):
    """A ``faust.App`` that carries :class:`SeamOptions` for the seam's transport, with
    typed access to the seam's classes it was configured with."""

    def __init__(self, id: str, *, seam: SeamOptions | None = None, **kwargs: Any) -> None:
        self.seam = seam if seam is not None else SeamOptions()
        #: called (in order) at the start of every pre-commit flush, before the producer
        #: counts what it must wait for: a part that buffers records of applied events
        #: outside Faust (the worker's track signals) hands them to the producer here, so
        #: the commit waits for them too (:class:`stream.faustx.producer.CommitFlushProducer`)
        self.before_commit: list[Callable[[], None]] = []
        super().__init__(id, **kwargs)

    def batched_table(self, name: str, **kwargs: Any) -> BatchedChangelogTable:
        """``app.Table(name, ...)``: a :class:`BatchedChangelogTable` on an app configured
        with ``Table=BatchedChangelogTable`` (as :func:`create_app` does)."""
        table = self.Table(name, **kwargs)
        if not isinstance(table, BatchedChangelogTable):
            raise TypeError(f"the app's Table class is {self.conf.Table!r}")
        return table

    def assigned_partitions(self, topic: str) -> set[int]:
        """The partitions of ``topic`` the consumer is assigned now."""
        return {tp.partition for tp in self.consumer.assignment() if tp.topic == topic}

    async def _producer_flush(self, logger: Any) -> None:
        """Faust's stop (and a revocation) flushes the producer until every buffered record
        is acknowledged, retrying an unreachable broker for 20 minutes: with
        ``seam.stop_timeout_s`` it gives up after a third of that (logged; pinned in compat,
        see :mod:`stream.faustx.shutdown`)."""
        flush = super()._producer_flush(logger)
        if self.seam.stop_timeout_s is None:
            await flush
        else:
            await shutdown.bounded_flush(flush, max(1.0, self.seam.stop_timeout_s / 3))

    def worker(self, **kwargs: Any) -> shutdown.SeamWorker:
        """A Faust worker for this app, of its ``Worker`` class (``SeamWorker`` as
        :func:`create_app` configures it: a bounded stop)."""
        worker_class: Any = self.conf.Worker
        worker = worker_class(self, **kwargs)
        if not isinstance(worker, shutdown.SeamWorker):
            raise TypeError(f"the app's Worker class is {worker_class!r}")
        return worker

    @property
    def seam_consumer(self) -> SeamConsumer:
        """``app.consumer``, as the seam transport's consumer class."""
        consumer = self.consumer
        if not isinstance(consumer, SeamConsumer):
            raise TypeError(f"the app's consumer is a {type(consumer).__name__}")
        return consumer


def broker_url(settings: Settings, scheme: str = transport.SCHEME) -> str:
    """Faust's broker URL for ``kafka_bootstrap``; the scheme picks the transport
    (``faustx``: the seam's; ``kafka``: Faust's own, for the load tests' baseline)."""
    return ";".join(f"{scheme}://{h.strip()}" for h in settings.kafka_bootstrap.split(","))


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


def options_for(settings: Settings) -> SeamOptions:
    """The seam options the worker's settings ask for."""
    return SeamOptions(
        in_loop=not settings.kafka_consumer_thread,
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        fetch_min_bytes=settings.kafka_fetch_min_bytes,
        fast_delivery=True,
        hold_topics=frozenset({settings.plays_topic}),
        stop_timeout_s=settings.shutdown_timeout_s,
    )


def create_app(settings: Settings, partitions: int) -> SeamApp:
    """The worker's Faust app for these settings (``partitions``: the plays topic's count),
    after the start-up compat check (:mod:`stream.faustx.compat`, setting
    ``faust_compat_check``). Its transport, stream and table classes are the seam's
    (``faustx://`` broker URLs, ``Stream=BatchingStream``, ``Table=BatchedChangelogTable``,
    ``Worker=SeamWorker``):
    ``app.batched_table(...)`` builds the session table, and an agent's stream is a
    :class:`BatchingStream`."""
    check_compat(settings.faust_compat_check)
    transport.register()
    app = SeamApp(
        settings.app_id,
        seam=options_for(settings),
        broker=broker_url(settings),
        broker_credentials=broker_credentials(settings),
        Stream=BatchingStream,
        Table=BatchedChangelogTable,
        TableManager=QuickTableManager,  # no fixed 1 s sleep at start (faustx.startup)
        Worker=shutdown.SeamWorker,  # run it as app.conf.Worker(app, ...): a bounded stop
        **faust_app_options(settings),  # table store, data dir, standbys, group membership
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
        # (stream.faustx.producer), so the inline commit never waits out the linger.
        producer_linger=0.1,
        producer_max_batch_size=256 * 1024,
    )
    logger.info(
        "Kafka consumer: %s",
        "in Faust's consumer thread (kafka_consumer_thread=true)"
        if settings.kafka_consumer_thread
        else "on the worker's event loop (kafka_consumer_thread=false)",
    )
    return app
