"""The start-up check that the Faust, mode and aiokafka code the seam depends on is the code
it was tested with.

Every upstream function or class the seam copies, overrides or relies on the inner workings
of is listed in :data:`TESTED` with a hash of its source (``inspect.getsource``, or the file
for Faust's Cython stream iterator) as installed when the seam was last tested.
:func:`check_compat` recomputes them at start-up (:func:`stream.faustx.app.create_app`):
any difference fails the start-up with a :class:`~stream.errors.CompatError` naming each
changed function, unless the setting ``faust_compat_check`` is ``warn`` (log it and go on)
or ``off``. The dependencies are also pinned to exact versions (pyproject.toml); the hashes
catch what a pin does not: a patched or differently built copy, or a pin moved without
re-testing.

After upgrading Faust, mode or aiokafka: re-read each listed function against the seam's
module that uses it (the ``why`` column), run the unit and integration tests, then print the
new table with ``python -m stream.faustx.compat`` and paste it here.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from stream.config import COMPAT_CHECKS
from stream.errors import CompatError

logger = logging.getLogger(__name__)

#: the check's modes (setting ``faust_compat_check``)
MODES: Final = COMPAT_CHECKS

#: the exact versions the seam was tested with (pinned in pyproject.toml)
TESTED_VERSIONS: Final = {
    "faust-streaming": "0.15.3",
    "mode-streaming": "0.7.1",
    "aiokafka": "0.14.0",
}


@dataclass(frozen=True, slots=True)
class Pin:
    """One upstream source: ``module:Qual.name`` (or ``file:package/path``), the hash of its
    source as tested, and which part of the seam depends on it."""

    target: str
    sha256: str
    why: str


#: sha256 of each source, first 16 hex digits (regenerate: python -m stream.faustx.compat)
TESTED: Final[tuple[Pin, ...]] = (
    Pin(
        "faust.transport.consumer:Consumer._drain_messages",
        "44a2500309e83c63",
        "copied by faustx.delivery.drain_messages",
    ),
    Pin(
        "faust.transport.consumer:Consumer.getmany",
        "4b168d84882a70d6",
        "no await between collecting a batch and its first message: faustx.delivery's reread count",
    ),
    Pin(
        "faust.transport.consumer:Consumer._wait_next_records",
        "6218e1969a636b3f",
        "no await after a batch is collected, a synchronous seek: faustx.delivery's rereads",
    ),
    Pin(
        "faust.transport.consumer:Consumer.on_buffer_full",
        "c8961679e0bcdce5",
        "a full buffer's partition is in _buffered_partitions: faustx.delivery's short wait",
    ),
    Pin(
        "faust.transport.consumer:Consumer.on_buffer_drop",
        "4b57e8a418d5ad9c",
        "a drained buffer's partition leaves _buffered_partitions: faustx.delivery's short wait",
    ),
    Pin(
        "faust.transport.drivers.aiokafka:AIOKafkaConsumerThread.getmany",
        "26fc5fc9f3b667e1",
        "no await after a batch is collected, a synchronous seek: faustx.delivery's rereads",
    ),
    Pin(
        "faust.transport.drivers.aiokafka:AIOKafkaConsumerThread._fetch_records",
        "39a2c6c79fc1455a",
        "no await after a batch is collected, a synchronous seek: faustx.delivery's rereads",
    ),
    Pin(
        "faust.transport.drivers.aiokafka:AIOKafkaConsumerThread.seek",
        "1498560d05f02582",
        "no await after a batch is collected, a synchronous seek: faustx.delivery's rereads",
    ),
    Pin(
        "aiokafka.consumer.fetcher:Fetcher.fetched_records",
        "be4348896b9b66af",
        "no await after a batch is collected, a synchronous seek: faustx.delivery's rereads",
    ),
    Pin(
        "aiokafka.consumer.consumer:AIOKafkaConsumer.getmany",
        "bc6d248e42a4e9d9",
        "no await after a batch is collected, a synchronous seek: faustx.delivery's rereads",
    ),
    Pin(
        "aiokafka.consumer.consumer:AIOKafkaConsumer.seek",
        "a9430f1f3b9ac419",
        "no await after a batch is collected, a synchronous seek: faustx.delivery's rereads",
    ),
    Pin(
        "faust.transport.consumer:Consumer.seek",
        "b86a9fe05f956b30",
        "resets the read offset: faustx.consumer.SeamConsumer.read_again",
    ),
    Pin(
        "faust.transport.consumer:Consumer._add_gap",
        "4df2573ded7c1c2c",
        "the gaps faustx.consumer.SeamConsumer.read_again cuts",
    ),
    Pin(
        "aiokafka.consumer.fetcher:Fetcher.seek_to",
        "f0ba6aba6c22ef83",
        "drops the partition's fetched records: faustx.consumer.SeamConsumer.read_again",
    ),
    Pin(
        "faust.transport.consumer:Fetcher._fetcher",
        "68f894f0b577d810",
        "runs consumer._drain_messages (faustx.consumer.SeamConsumer)",
    ),
    Pin(
        "faust.transport.conductor:ConductorCompiler.build",
        "837cf521368c1ee4",
        "where on_message blocks (faustx.delivery.can_deliver_now)",
    ),
    Pin(
        "faust.transport.conductor:Conductor._compile_message_handler",
        "9fbc0538097aa4ec",
        "the callback lock (faustx.delivery.can_deliver_now)",
    ),
    Pin(
        "faust.transport.consumer:Consumer.perform_seek",
        "0e8c130ff4b0afd8",
        "overridden: resume after seek, and where the plays streams start (faustx.consumer)",
    ),
    Pin(
        "faust.transport.consumer:Consumer._clean_unacked_messages",
        "11be2587e71c9162",
        "drops messages marked acked: faustx.stream.drop_unapplied relies on it",
    ),
    Pin(
        "faust.transport.consumer:Consumer._new_offset",
        "1d2c7ea89a7ad4f1",
        "skips its hole check with no committed offset: why the plays agent has a fence",
    ),
    Pin(
        "faust.transport.consumer:Consumer.resume_partitions",
        "afe6b7c02a41d63c",
        "overridden: resume after seek, and where the plays streams start (faustx.consumer)",
    ),
    Pin(
        "faust.transport.consumer:Consumer.pause_partitions",
        "27a1c94bdacd54de",
        "overridden: resume after seek, and where the plays streams start (faustx.consumer)",
    ),
    Pin(
        "faust.transport.consumer:Consumer.resume_flow",
        "db59630f25b5819b",
        "overridden: resume after seek, and where the plays streams start (faustx.consumer)",
    ),
    Pin(
        "faust.tables.recovery:Recovery._resume_streams",
        "d986a6710c1aca98",
        "resumes, seeks, then resumes flow (faustx.consumer)",
    ),
    Pin(
        "faust.tables.recovery:Recovery.on_recovery_completed",
        "6ef567acf072e46d",
        "resumes, seeks, then resumes flow (faustx.consumer)",
    ),
    Pin(
        "faust.tables.recovery:Recovery._restart_recovery",
        "6bd8a8558a2dffe4",
        "resumes flow after app.flow_control (faustx.consumer)",
    ),
    Pin(
        "faust.transport.drivers.aiokafka:Consumer._new_consumer_thread",
        "0870ec53dea75083",
        "overridden: the consumer thread class (faustx.consumer)",
    ),
    Pin(
        "faust.transport.drivers.aiokafka:AIOKafkaConsumerThread._create_worker_consumer",
        "c2701bfc3e6f6cad",
        "extended: fetch wait (faustx.consumer)",
    ),
    Pin(
        "aiokafka.consumer.consumer:AIOKafkaConsumer.__init__",
        "01506f316191f7c9",
        "stores the fetch wait attributes set by faustx.consumer",
    ),
    Pin(
        "aiokafka.consumer.consumer:AIOKafkaConsumer.start",
        "2f1ba70443327538",
        "reads the fetch wait attributes set by faustx.consumer",
    ),
    Pin(
        "mode.threads:ServiceThread.start",
        "f11841038a033a05",
        "copied without the thread by faustx.consumer.InLoopConsumerThread",
    ),
    Pin(
        "mode.threads:ServiceThread.stop",
        "32d026539c3665b2",
        "overridden by faustx.consumer.InLoopConsumerThread",
    ),
    Pin(
        "mode.threads:ServiceThread._serve",
        "67809eae09573ac7",
        "run as a task by faustx.consumer.InLoopConsumerThread",
    ),
    Pin(
        "mode.threads:ServiceThread._gather_remaining_tasks",
        "6f65b92dd1012485",
        "overridden by faustx.consumer.InLoopConsumerThread",
    ),
    Pin(
        "mode.threads:QueueServiceThread.call_thread",
        "479edda75b54734b",
        "overridden by faustx.consumer.InLoopConsumerThread",
    ),
    Pin(
        "mode.threads:QueueServiceThread.cast_thread",
        "32489f1ee4f80e67",
        "overridden by faustx.consumer.InLoopConsumerThread",
    ),
    Pin(
        "faust.transport.consumer:Consumer.commit",
        "a354437baaa08bf8",
        "sets _commit_fut, read by faustx.consumer.SeamConsumer.committing",
    ),
    Pin(
        "faust.transport.producer:Producer.__init__",
        "5c53a4b47aa1372b",
        "builds the buffer faustx.producer replaces",
    ),
    Pin(
        "faust.transport.producer:ProducerBuffer.put",
        "bf26dfbc01d91088",
        "extended: counted (faustx.producer)",
    ),
    Pin(
        "faust.transport.producer:ProducerBuffer._send_pending",
        "4a9d5f932b56bc68",
        "extended: counted (faustx.producer)",
    ),
    Pin(
        "faust.transport.producer:ProducerBuffer._handle_pending",
        "78d648030fd21016",
        "calls _send_pending (faustx.producer)",
    ),
    Pin(
        "faust.transport.drivers.aiokafka:Producer.flush",
        "36d0cb3615f65b01",
        "replaced by faustx.producer.CommitFlushProducer.flush",
    ),
    Pin(
        "aiokafka.producer.message_accumulator:MessageAccumulator.flush_for_commit",
        "39683730fcffc2a4",
        "called by faustx.producer",
    ),
    Pin(
        "faust.streams:Stream._py_aiter",
        "3a48ee257a65435b",
        "the iterator faustx.stream.take_buffered mirrors",
    ),
    Pin(
        "file:faust/_cython/streams.pyx",
        "0041622f4a251188",
        "the compiled iterator faustx.stream.take_buffered mirrors",
    ),
    Pin(
        "faust.streams:Stream._set_current_event",
        "b9a41294b605ac08",
        "called by faustx.stream.BatchingStream",
    ),
    Pin(
        "faust.tables.table:Table.on_key_set",
        "a370e35ca55c2c7e",
        "overridden by faustx.changelog_table",
    ),
    Pin(
        "faust.tables.table:Table.on_key_del",
        "4f2900b2f9d24a08",
        "overridden by faustx.changelog_table",
    ),
    Pin(
        "faust.tables.base:Collection._on_changelog_sent",
        "60122c86a120d82c",
        "mirrored by faustx.changelog_table",
    ),
    Pin(
        "faust.tables.base:Collection.partition_for_key",
        "3b2291811b8dd791",
        "called by faustx.changelog_table",
    ),
    Pin(
        "faust.tables.base:Collection._new_store",
        "914a2bda605d38f5",
        "extended: the memory store's dict in shards (faustx.changelog_table)",
    ),
    Pin(
        "faust.stores.memory:Store",
        "83ceb1145af05eae",
        "its data is a stream.core.shards.ShardedDict: every use is a MutableMapping's "
        "(faustx.changelog_table)",
    ),
    Pin(
        "mode.utils.collections:FastUserDict",
        "15009834fb57aa61",
        "the memory store's methods: every use of its data is a MutableMapping's "
        "(faustx.changelog_table)",
    ),
    Pin(
        "aiokafka.client:AIOKafkaClient.fetch_all_metadata",
        "8eeea5926b0ddbe2",
        "called by faustx.kafka_client.cluster_metadata",
    ),
    Pin(
        "aiokafka.admin.client:AIOKafkaAdminClient._send_request",
        "1ed126f126dd917a",
        "called by faustx.kafka_client.send_admin_request",
    ),
    Pin(
        "faust.stores.rocksdb:Store._db_for_partition",
        "cb7e67d5f9efc4bc",
        "called by faustx.tablestore.read_in_partition (a key's own partition)",
    ),
    Pin(
        "faust.stores.rocksdb:Store._dbs_for_actives",
        "28ffca271cde5b06",
        "called by faustx.tablestore.approx_len",
    ),
    Pin(
        "faust.stores.rocksdb:Store.persisted_offset",
        "6f2e502fb86043a1",
        "a restart / promoted standby reads the changelog from here (faustx.tablestore)",
    ),
    Pin(
        "faust.stores.rocksdb:Store.set_persisted_offset",
        "b4c811926678346e",
        "called by faustx.changelog_table._record_persisted",
    ),
    Pin(
        "faust.stores.rocksdb:Store.apply_changelog_batch",
        "ea3344d369fc4ab5",
        "standby copies record their offsets (table_standby_replicas with rocksdb)",
    ),
    Pin(
        "faust.stores.memory:Store.on_recovery_completed",
        "a00bef343e139602",
        "drops standby keys: why faustx.tablestore runs no standbys with memory",
    ),
    Pin(
        "faust.tables.recovery:Recovery._add",
        "1584a197b11bf835",
        "a partition's recovery starts at the store's persisted offset (faustx.tablestore)",
    ),
    Pin(
        "faust.app.base:App._producer_flush",
        "35c92baa028d57bd",
        "overridden by faustx.app.SeamApp._producer_flush (bounded stop flush)",
    ),
    Pin(
        "faust.tables.manager:TableManager.on_start",
        "365dd25fbc0e0684",
        "copied without its 1 s sleep by faustx.startup.QuickTableManager",
    ),
    Pin(
        "faust.assignor.leader_assignor:LeaderAssignor",
        "c3f79f79c3ef88d6",
        "its leader topic's name, as faustx.startup.declared_topics spells it",
    ),
    Pin(
        "faust.worker:Worker._setproctitle",
        "0bb3262b8efbd757",
        "overridden by faustx.shutdown.SeamWorker (keeps the command line stream stack finds)",
    ),
    Pin(
        "mode.worker:Worker._schedule_shutdown",
        "1a6a5dfc88c2298b",
        "overridden by faustx.shutdown.SeamWorker (arms the stop deadline)",
    ),    Pin(
        "faust.topics:Topic.prepare_key",
        "e201b689d5cdc828",
        "mirrored by faustx.changelog_table.RecordEncoder (the same record bytes)",
    ),
    Pin(
        "faust.topics:Topic.prepare_value",
        "5daf3918f136205c",
        "mirrored by faustx.changelog_table.RecordEncoder (the same record bytes)",
    ),
    Pin(
        "faust.channels:Channel.prepare_headers",
        "568f12c6e3e2dced",
        "mirrored by faustx.changelog_table.RecordEncoder (the same record bytes)",
    ),
    Pin(
        "faust.serializers.schemas:Schema.dumps_key",
        "9111344cec6fe907",
        "mirrored by faustx.changelog_table.RecordEncoder (the same record bytes)",
    ),
    Pin(
        "faust.serializers.schemas:Schema.dumps_value",
        "ed76836c509acb8b",
        "mirrored by faustx.changelog_table.RecordEncoder (the same record bytes)",
    ),
    Pin(
        "faust.serializers.schemas:Schema.on_dumps_key_prepare_headers",
        "9cf7e1429f9d7b49",
        "mirrored by faustx.changelog_table.RecordEncoder (the same record bytes)",
    ),
    Pin(
        "faust.serializers.schemas:Schema.on_dumps_value_prepare_headers",
        "fc8607e166450014",
        "mirrored by faustx.changelog_table.RecordEncoder (the same record bytes)",
    ),
    Pin(
        "faust.serializers.registry:Registry.dumps_key",
        "29323a129b8168f0",
        "mirrored by faustx.changelog_table.RecordEncoder (the same record bytes)",
    ),
    Pin(
        "faust.serializers.registry:Registry.dumps_value",
        "42c1fc28dd371ead",
        "mirrored by faustx.changelog_table.RecordEncoder (the same record bytes)",
    ),
    Pin(
        "faust.serializers.registry:Registry._serializer",
        "b4de5184ece7e753",
        "mirrored by faustx.changelog_table.RecordEncoder (the same record bytes)",
    ),
    Pin(
        "faust.serializers.codecs:dumps",
        "db4cbf6e125bab95",
        "mirrored by faustx.changelog_table.RecordEncoder (the same record bytes)",
    ),
    Pin(
        "faust.serializers.codecs:get_codec",
        "d215f62a3bab24cc",
        "mirrored by faustx.changelog_table.RecordEncoder (the same record bytes)",
    ),
    Pin(
        "faust.serializers.codecs:Codec.dumps",
        "cf18c4ce2b00d8e6",
        "mirrored by faustx.changelog_table.RecordEncoder (the same record bytes)",
    ),
    Pin(
        "mode.utils.collections:ManagedUserDict.__getitem__",
        "9fb8a44e8d5e9994",
        "inlined by faustx.changelog_table.BatchedChangelogTable.get",
    ),
    Pin(
        "mode.utils.collections:FastUserDict.__getitem__",
        "eb240364b8add831",
        "inlined by faustx.changelog_table.BatchedChangelogTable.get",
    ),
    Pin(
        # resolved through Faust's Table: a __getitem__ Faust adds on Table or Collection
        # changes this hash although mode's own stays the same (review of session 14)
        "faust.tables.table:Table.__getitem__",
        "9fb8a44e8d5e9994",
        "inlined by faustx.changelog_table.BatchedChangelogTable.get",
    ),
    Pin(
        "faust.tables.table:Table.__missing__",
        "41f1eeec55584b3a",
        "called by faustx.changelog_table.BatchedChangelogTable.get (KeyError: no default)",
    ),
)


#: upstream attributes that must still be a given object (sources that cannot be hashed:
#: ``collections.abc`` is frozen in 3.11): (target, the expected object's target, why)
SAME_AS: Final = (
    ("faust.tables.table:Table.get", "collections.abc:Mapping.get",
     "BatchedChangelogTable.get inlines Mapping.get over Faust's __getitem__"),
)


def resolve(target: str) -> Any:
    """The object (or, for ``file:...``, the path) ``target`` names."""
    if target.startswith("file:"):
        package, _, rel = target[len("file:"):].partition("/")
        module = importlib.import_module(package)
        return Path(inspect.getfile(module)).parent / rel
    module_name, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def source_hash(target: str) -> str:
    """sha256 (16 hex digits) of ``target``'s source as installed now."""
    obj = resolve(target)
    if isinstance(obj, Path):
        text = obj.read_text()
    else:
        # a mode ServiceTask (``@Service.task``) wraps its coroutine function in ``fun``
        fun = getattr(obj, "fun", obj) if not inspect.isroutine(obj) else obj
        text = inspect.getsource(inspect.unwrap(fun))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def mismatches(pins: tuple[Pin, ...] | None = None) -> list[str]:
    """One line per pinned source that differs from what was tested (or is gone)."""
    out: list[str] = []
    for pin in TESTED if pins is None else pins:
        try:
            found = source_hash(pin.target)
        except (ImportError, AttributeError, OSError, TypeError) as exc:
            out.append(f"{pin.target}: not found ({type(exc).__name__}: {exc}); {pin.why}")
            continue
        if found != pin.sha256:
            out.append(f"{pin.target}: source changed (sha256 {found}, tested {pin.sha256}); "
                       f"{pin.why}")
    if pins is None:
        for target, expected, why in SAME_AS:
            try:
                same = resolve(target) is resolve(expected)
            except (ImportError, AttributeError) as exc:
                out.append(f"{target}: not found ({type(exc).__name__}: {exc}); {why}")
                continue
            if not same:
                out.append(f"{target}: is no longer {expected}; {why}")
    return out


def installed_versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for dist in TESTED_VERSIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def check_compat(mode: str = "error", pins: tuple[Pin, ...] | None = None) -> list[str]:
    """Compare the pinned upstream sources with what is installed. ``error``: raise
    :class:`CompatError` naming every changed one; ``warn``: log them; ``off``: skip.
    Returns the mismatches found."""
    if mode not in MODES:
        raise ValueError(f"faust_compat_check must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return []
    found = mismatches(pins)
    if not found:
        return []
    versions = ", ".join(f"{d} {v}" for d, v in installed_versions().items())
    tested = ", ".join(f"{d} {v}" for d, v in TESTED_VERSIONS.items())
    message = (
        f"the Faust/aiokafka code the worker's seam (stream.faustx) depends on is not the "
        f"code it was tested with (installed: {versions}; tested: {tested}):\n  "
        + "\n  ".join(found)
        + "\nInstall the tested versions (pip install -e .), or re-test the seam and update "
        "stream/faustx/compat.py; faust_compat_check=warn starts anyway."
    )
    if mode == "error":
        raise CompatError(message)
    logger.warning("faust_compat_check=warn: %s", message)
    return found


def main() -> None:
    """Print the table of current hashes (to paste into TESTED after re-testing)."""
    for pin in TESTED:
        print(f'    Pin(\n        "{pin.target}",\n        "{source_hash(pin.target)}",\n'
              f'        "{pin.why}",\n    ),')


if __name__ == "__main__":
    main()
