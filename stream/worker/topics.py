"""The worker's Kafka topics and its session table.

- ``plays`` (keyed by user id, raw bytes) and ``plays-control`` (co-partitioned with it);
- the dead-letter topic and the signals topic (raw bytes);
- ``sessions``: the per-listener :class:`stream.core.session.UserState` table, its changelog
  written in batches (:mod:`stream.faustx.changelog_table`): live objects in the store,
  orjson on the changelog (:class:`UserStateCodec`).
"""

from __future__ import annotations

import base64
from array import array
from dataclasses import dataclass
from typing import Any, Final

import faust
import orjson
from faust.serializers import codecs

from stream.adapters.kafka import signals_topic
from stream.config import Settings
from stream.core.session import UserState
from stream.faustx.app import SeamApp
from stream.faustx.changelog_table import BatchedChangelogTable
from stream.faustx.tablestore import table_options

USER_STATE_CODEC: Final = "user_state"


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


@dataclass(frozen=True, slots=True)
class LifeOrder:
    """A session-table value's place among its listener's records (see :func:`state_order`)."""

    born_offset: int
    seq: int
    last_offset: int

    def __lt__(self, other: LifeOrder) -> bool:
        if self.born_offset >= 0 and other.born_offset >= 0:
            return (self.born_offset, self.seq) < (other.born_offset, other.seq)
        # a record of a worker that predates born_offset: its life ended before the other's
        # began if its last play lies before that life's first one
        if self.born_offset < 0 <= other.born_offset and 0 <= self.last_offset < other.born_offset:
            return True
        if other.born_offset < 0 <= self.born_offset and 0 <= other.last_offset < self.born_offset:
            return False
        # both unstamped, or an unstamped record that continues a stamped life (a rolling
        # upgrade or a rollback: old and new workers continue each other's lives)
        return self.seq < other.seq


def state_order(value: Any) -> LifeOrder | None:
    """A session-table value's order for changelog recovery: ``(born_offset, seq)``.

    ``seq`` (plays applied) orders the records of one life of a listener; it starts again
    at 1 after a forget or an eviction (a tombstone), so a later life is told by the offset
    of the play that began it (``born_offset``: a later life's first play lies later in the
    listener's partition). Without it, a RocksDB store that still held an old life (its
    tombstone compacted away) would skip the new life's records as older. A record written
    by a worker that predates the field reads -1: it is older than a stamped life that
    began after its last play (``last_offset``), and otherwise compared by ``seq`` (a
    rolling upgrade: old and new workers continue each other's lives)."""
    seq = getattr(value, "seq", None)
    born = getattr(value, "born_offset", None)
    if type(seq) is not int or type(born) is not int:
        return None
    last = getattr(value, "last_offset", -1)
    return LifeOrder(born, seq, last if type(last) is int else -1)


@dataclass(frozen=True)
class Topics:
    plays: Any
    control: Any
    dlq: Any
    signals: Any
    signals_name: str
    sessions: BatchedChangelogTable


def declare_topics(app: SeamApp, settings: Settings, partitions: int) -> Topics:
    """Declare the topics and the session table on ``app`` (``partitions``: the plays
    topic's count; control and the table are co-partitioned with it)."""
    raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
    plays = app.topic(settings.plays_topic, key_type=bytes, value_type=bytes,
                      partitions=partitions, **raw)
    control = app.topic(settings.control_topic, key_type=bytes, value_type=bytes,
                        partitions=partitions, **raw)
    dlq = app.topic(settings.dlq_topic, **raw)
    signals_name = signals_topic(settings)  # created by ensure_topics; read by SignalReader
    signals = app.topic(signals_name, **raw)
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
    # recovery keeps a listener's newer state of two (by plays applied): late records of a
    # worker fenced after a freeze must not set a listener back (stream.worker.fencing)
    sessions.order = state_order
    return Topics(plays, control, dlq, signals, signals_name, sessions)
