"""The session table's changelog, written in batches straight to the Kafka producer.

Faust writes one changelog record per table assignment through its own machinery: a
``FutureMessage``, its producer buffer, a hand-over task, ``Topic.publish_message`` and
per-record sensor and delivery callbacks. In the worker that cost ~260 us per play, more
than the recommendation core (P1 drain 1,005 -> 1,366 events/s with the table replaced by
a dict, docs/benchmarks.md). :class:`BatchedChangelogTable` keeps Faust's table (store,
recovery, standbys, the changelog topic and its serialisers) and only replaces that send
path:

- an assignment marks the key dirty with the partition of the event being processed;
- :meth:`BatchedChangelogTable.send_dirty` serialises every dirty key's *latest* value and
  hands it to the aiokafka producer; the worker calls it every few milliseconds from the
  agent, and the commit flush (:class:`stream.faustx.producer.CommitFlushProducer`) calls it
  before it waits for the producer, so no offset is committed ahead of the state it led to;
- a delivery that failed marks its key dirty again with its current value and fails the
  commit, so the offsets stay where they were and the state is sent again.

Deletes (``del table[key]``, the tombstones of forgotten listeners) take the same path, as
a pending tombstone for the key, so one queue keeps every key's records in order. A failed
record is resent with the key's *current* value (or a tombstone if it is gone), never its
own older one. The app gets this class with ``App(Table=...)`` (stream.faustx.app), and
``app.Table(name, ...)`` builds one.

Recovery (and standbys) keep the newer of two records of a key when the table is given an
``order`` (:attr:`BatchedChangelogTable.order`: the worker's is the listener's
``(born_offset, seq)``: the offset of the play that began this life of the listener, then
the count of plays applied): a value whose order is below the one already held for its key is
skipped (:meth:`BatchedChangelogTable.apply_changelog_batch`). A worker frozen past its
session can have changelog records land *after* the new owner's (its producer may send
what it held before it notices and exits, :mod:`stream.worker.fencing`); read in log order
they would set the listener back. Tombstones (forgotten listeners) always apply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

import faust
from faust.serializers import codecs as faust_codecs
from faust.serializers.registry import Registry as _FaustRegistry
from faust.stores.memory import Store as _MemoryStore
from faust.types.models import ModelT

from stream.core.shards import ShardedDict
from stream.faustx.tablestore import approx_len, is_persistent, read_in_partition

logger = logging.getLogger(__name__)


class ChangelogSendError(RuntimeError):
    """A batched changelog record could not be delivered: do not commit past it."""


_FAUST_PREPARE_HEADERS: Final = faust.Topic.prepare_headers
_FAUST_PREPARE_KEY: Final = faust.Topic.prepare_key
_FAUST_PREPARE_VALUE: Final = faust.Topic.prepare_value

#: the pending "value" of a deleted key: sent as a tombstone (no value)
_TOMBSTONE: Any = object()


class BatchedChangelogTable(faust.Table):  # type: ignore[type-arg]
    """A Faust table whose changelog records are coalesced per key and sent in batches."""

    def __post_init__(self) -> None:
        super().__post_init__()
        #: key -> (changelog partition, latest value): assigned, not yet sent
        self._dirty: dict[Any, tuple[int, Any]] = {}
        #: sent, not yet known to be delivered: (future, key, partition, value)
        self._in_flight: list[tuple[asyncio.Future[Any], Any, int, Any]] = []
        self._send_lock = asyncio.Lock()
        self.records_sent = 0
        #: a value's order (any comparable: the worker's is (born_offset, seq)): recovery
        #: skips a record below the value held for its key (None: log order, as Faust);
        #: None from it means "no order" (applied)
        self.order: Callable[[Any], Any] | None = None
        #: records recovery skipped as older than the value held (see the module docstring)
        self.older_skipped = 0

    def _new_store(self) -> Any:
        """Faust's store; the memory store's dict in 64 shards (stream.core.shards): at
        500k listeners one growth of a single dict held the event loop ~25 ms, in the same
        turn as the other per-listener maps' (docs/benchmarks.md, "The junk-ids drill,
        session 15"). The memory store and its base use their ``data`` only as a mapping
        (pinned in faustx.compat)."""
        store = super()._new_store()
        if type(store) is _MemoryStore:
            store.data = ShardedDict()
        return store

    # -- recovery -------------------------------------------------------------------------

    def apply_changelog_batch(self, batch: Iterable[Any]) -> None:
        """Faust's recovery and standby hook: apply changelog events to the store, skipping
        a value older (by :attr:`order`) than the one already held for its key."""
        if self.order is None:
            super().apply_changelog_batch(batch)
            return
        kept = self._newer_only(batch, self.order)
        super().apply_changelog_batch(kept)

    def _newer_only(self, batch: Iterable[Any], order: Callable[[Any], Any]) -> list[Any]:
        held: dict[Any, Any] = {}  # key -> order of its latest value (None: absent)
        kept: list[Any] = []
        skipped = 0
        for event in batch:
            key = self._to_key(event.key)
            if event.message.value is None:  # a tombstone always applies
                held[key] = None
                kept.append(event)
                continue
            rank = order(event.value)
            if key not in held:
                current = read_in_partition(self.data, key, event.message.partition)
                held[key] = None if current is None else order(current)
            before = held[key]
            if rank is not None and before is not None and rank < before:
                skipped += 1
                continue
            held[key] = rank
            kept.append(event)
        if skipped:
            self.older_skipped += skipped
            logger.warning("changelog recovery of %s skipped %d record(s) older than the state "
                           "already read for their key (late records of a fenced worker; "
                           "%d so far)", self.name, skipped, self.older_skipped)
        return kept

    # -- Faust hooks ----------------------------------------------------------------------

    def get(self, key: Any, default: Any = None) -> Any:
        """``Mapping.get`` through Faust's ``__getitem__`` (``ManagedUserDict``: the get
        sensor; ``FastUserDict``: the store, else ``__missing__``), inlined: the worker
        reads a listener's state once per play, and the three frames cost ~0.7 us of ~1.1
        (pinned in stream.faustx.compat). The same calls in the same order, the same
        result: the value, else the table's default, else ``default``."""
        try:
            self.on_key_get(key)
            data = self.data
            if key in data:
                return data[key]
            return self.__missing__(key)
        except KeyError:
            return default

    def on_key_set(self, key: Any, value: Any) -> None:
        """Called by ``table[key] = value`` inside stream iteration (after the store set)."""
        partition = self.partition_for_key(key)  # the current event's partition
        if partition is None:  # use_partitioner tables are not batched
            super().on_key_set(key, value)
            return
        self._dirty[key] = (partition, value)

    def on_key_del(self, key: Any) -> None:
        """Called by ``del table[key]`` inside stream iteration: a pending tombstone, on the
        same queue as the key's values (Faust's own path is a different queue, so a value
        sent after the delete could overtake it)."""
        partition = self.partition_for_key(key)
        if partition is None:
            super().on_key_del(key)
            return
        self._dirty.pop(key, None)  # keep assignment order: the tombstone goes last
        self._dirty[key] = (partition, _TOMBSTONE)

    def delete_on(self, key: Any, partition: int, *, changelog: bool = True) -> bool:
        """Delete ``key`` outside stream iteration (no current event says its partition):
        the caller names its changelog ``partition`` (the listener's, from their state).
        The tombstone goes on the same queue as the key's values. With ``changelog`` off
        the key only leaves this process's store (a partition it no longer owns: its new
        owner's changelog must not be touched). Returns whether the key was there."""
        if key not in self.data:
            return False
        del self.data[key]
        if changelog:
            self._dirty.pop(key, None)
            self._dirty[key] = (partition, _TOMBSTONE)
        return True

    def resend(self, key: Any) -> None:
        """Send the key's current value to the changelog again (called for a play that was
        already applied: a replay after a crash). With a persistent store the worker may have
        written that state locally and died before its changelog record went out; the
        replayed play changes nothing, so without this the changelog (what a standby or
        another host restores) would never get it. A no-op with the memory store, whose state
        always comes from the changelog."""
        if not is_persistent(self.data) or key in self._dirty:
            return
        partition = self.partition_for_key(key)
        if partition is not None:
            self._dirty[key] = (partition, self._current(key, partition))

    def _current(self, key: Any, partition: int) -> Any:
        """The key's value in the store now, or the tombstone marker if it is gone."""
        value = read_in_partition(self.data, key, partition)
        return _TOMBSTONE if value is None else value

    # -- sending --------------------------------------------------------------------------

    @property
    def dirty(self) -> int:
        """Keys assigned since their last changelog record was handed to the producer."""
        return len(self._dirty)

    async def send_dirty(self) -> int:
        """Hand every dirty key's latest value to the producer (in assignment order).
        Returns how many records were handed over. On a producer error the keys not yet
        handed over stay dirty and the error propagates.

        The lock is taken even when nothing is dirty: a commit's call must not return while
        another call (the agent's) is still handing over the batch it took."""
        async with self._send_lock:  # snapshots are sent in order, never interleaved
            if not self._dirty:
                return 0
            topic: Any = self.changelog_topic  # a faust Topic (prepare_* are not on TopicT)
            name = topic.get_topic_name()
            producer = self.app.producer
            # built before the batch is taken: a codec that cannot be resolved raises with
            # every key still dirty (review of session 14)
            encode = RecordEncoder(topic, self.app, self.key_serializer, self.value_serializer)
            batch, self._dirty = self._dirty, {}
            sent = 0
            items = list(batch.items())
            try:
                for key, (partition, value) in items:
                    key_bytes, value_bytes, headers = encode(key, value)
                    fut: Any = await producer.send(
                        name, key_bytes, value_bytes, partition, time.time(), headers
                    )
                    self._in_flight.append((fut, key, partition, value))
                    sent += 1
            except BaseException:
                for key, (partition, value) in items[sent:]:
                    self._dirty.setdefault(key, (partition, value))
                raise
            self.records_sent += sent
            if len(self._in_flight) > 4096:  # no commit for a while: drop what is delivered
                self._prune_delivered()
            return sent

    def keys_snapshot(self) -> list[Any]:
        """Every key the table holds now, as a list (reads every key of a RocksDB store)."""
        return list(self.data.keys())

    def keys_chunks(self, size: int) -> Iterator[list[Any]]:
        """Every key the table holds, a list at a time, each taken when asked for: one
        shard of the memory store's :class:`ShardedDict` (~7.8k keys at 500k listeners),
        or ``size`` keys of one snapshot of another store. A list of all 500k at once held
        the event loop 54 ms of its own CPU in the 1M junk drill (docs/benchmarks.md, "The
        1M drills of session 16"). Taken over several batches, a key added after its shard
        was listed is missed and one deleted since may still be named."""
        inner = getattr(self.data, "data", None)
        if isinstance(inner, ShardedDict):
            for shard in inner.shards:
                yield list(shard)
            return
        keys = self.keys_snapshot()
        for lo in range(0, len(keys), size):
            yield keys[lo : lo + size]

    def approx_len(self) -> int:
        """How many listeners the table holds (RocksDB: its estimate; ``len`` reads every
        key there)."""
        return approx_len(self.data)

    def _prune_delivered(self) -> None:
        """Drop delivered records from the in-flight list; failed ones stay for the next
        commit's :meth:`check_delivered` (which fails that commit and resends them)."""
        self._record_persisted([e for e in self._in_flight if _delivered(e[0])])
        self._in_flight = [e for e in self._in_flight if not _delivered(e[0])]

    def _record_persisted(self, delivered: list[tuple[asyncio.Future[Any], Any, int, Any]]) -> None:
        """What Faust's ``_on_changelog_sent`` does per record: tell the store the highest
        changelog offset it holds per partition (a rocksdb store then skips those on
        recovery; the memory store ignores it)."""
        highest: dict[Any, int] = {}
        for fut, *_ in delivered:
            meta = fut.result()
            tp, offset = getattr(meta, "topic_partition", None), getattr(meta, "offset", None)
            if tp is not None and isinstance(offset, int) and offset > highest.get(tp, -1):
                highest[tp] = offset
        for tp, offset in highest.items():
            self.data.set_persisted_offset(tp, offset)

    def handed_over(self) -> list[asyncio.Future[Any]]:
        """Delivery futures of the records handed to the producer so far and not yet
        checked: what a commit starting now must wait for."""
        return [fut for fut, *_ in self._in_flight]

    async def wait_delivered(self, futures: list[asyncio.Future[Any]] | None = None) -> None:
        """Wait for ``futures`` (default: every record handed over so far) to be
        acknowledged or to fail, then :meth:`check_delivered`: raises
        :class:`ChangelogSendError` if any record failed. Records handed over later (the
        agent keeps sending during a commit) are not waited for."""
        pending = [f for f in (self.handed_over() if futures is None else futures)
                   if not f.done()]
        if pending:
            await asyncio.wait(pending)
        self.check_delivered()

    def check_delivered(self) -> int:
        """Drop delivered records from the in-flight list (recording their offsets, as
        Faust does); for failed ones, mark the key dirty again with its *current* value
        (or a tombstone if it is gone), unless something newer is already pending, and raise
        :class:`ChangelogSendError`. Returns how many are still in flight."""
        failed: list[BaseException] = []
        still: list[tuple[asyncio.Future[Any], Any, int, Any]] = []
        delivered: list[tuple[asyncio.Future[Any], Any, int, Any]] = []
        for entry in self._in_flight:
            fut, key, partition, _value = entry
            if not fut.done():
                still.append(entry)
                continue
            exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
            if exc is None:
                delivered.append(entry)
                continue
            failed.append(exc)
            if key not in self._dirty:
                self._dirty[key] = (partition, self._current(key, partition))
        self._in_flight = still
        self._record_persisted(delivered)
        if failed:
            raise ChangelogSendError(
                f"{len(failed)} session changelog record(s) not delivered ({failed[-1]!r}); "
                "not committing offsets past them (they are sent again)"
            )
        return len(still)


class RecordEncoder:
    """A changelog record's key, value and headers as Faust's ``Topic.prepare_headers``,
    ``prepare_key`` and ``prepare_value`` make them, with their lookups done once per batch.

    Faust's path resolves the schema, the serializer registry and the codec by name for
    every record (~1.7 us of ~3.7 per record, measured). Where that path is Faust's own
    (the topic's ``prepare_*`` and the schema's ``dumps_*`` not overridden, the app's
    registry Faust's, both serializers named), a ``str`` key and a value that is neither a
    Faust model nor bytes go straight to the codecs the names resolve to: the same calls
    Faust ends in (``Registry.dumps_key`` / ``dumps_value`` -> ``codecs.dumps``), so the
    same bytes, and no headers (Faust's are an empty dict there, sent as None). Anything
    else (a tombstone, a model, bytes, another key type, an adapted topic) takes Faust's
    path. The upstream functions this mirrors are pinned in :mod:`stream.faustx.compat`."""

    __slots__ = ("_topic", "_key_serializer", "_value_serializer", "_key_codec",
                 "_value_codec", "_plain_values")

    def __init__(self, topic: Any, app: Any, key_serializer: Any, value_serializer: Any) -> None:
        self._topic = topic
        self._key_serializer = key_serializer
        self._value_serializer = value_serializer
        self._key_codec: Any = None
        self._value_codec: Any = None
        #: value type -> whether Faust would hand it to the codec (not a model, not bytes)
        self._plain_values: dict[type, bool] = {}
        if (key_serializer and value_serializer
                and type(topic).prepare_headers is _FAUST_PREPARE_HEADERS
                and type(topic).prepare_key is _FAUST_PREPARE_KEY
                and type(topic).prepare_value is _FAUST_PREPARE_VALUE
                and type(topic.schema) is faust.Schema
                and type(app.serializers) is _FaustRegistry):
            self._key_codec = faust_codecs.get_codec(key_serializer)
            self._value_codec = faust_codecs.get_codec(value_serializer)

    def __call__(self, key: Any, value: Any) -> tuple[Any, Any, Any]:
        """(key bytes, value bytes, headers or None) of one record (``value`` may be the
        tombstone marker: no value)."""
        codec = self._value_codec
        if codec is not None and type(key) is str and value is not _TOMBSTONE:
            plain = self._plain_values.get(type(value))
            if plain is None:
                plain = self._plain_values[type(value)] = not issubclass(
                    type(value), (ModelT, bytes))
            if plain:
                return self._key_codec.dumps(key), codec.dumps(value), None
        return self.faust_record(key, value)

    def faust_record(self, key: Any, value: Any) -> tuple[Any, Any, Any]:
        """Faust's own path (every record of a batch before this class existed)."""
        topic = self._topic
        headers = topic.prepare_headers(None)
        key_bytes, headers = topic.prepare_key(key, self._key_serializer, None, headers)
        if value is _TOMBSTONE:  # as Faust's on_key_del: no value, raw
            value_bytes, headers = topic.prepare_value(None, "raw", None, headers)
        else:
            value_bytes, headers = topic.prepare_value(
                value, self._value_serializer, None, headers
            )
        return key_bytes, value_bytes, headers or None


def _delivered(fut: asyncio.Future[Any]) -> bool:
    return fut.done() and not fut.cancelled() and fut.exception() is None
