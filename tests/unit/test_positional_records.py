"""The hot path builds these records with positional arguments (keywords cost ~1-2 us a
play in the generated ``__init__``: docs/benchmarks.md, "Session 13: P1"). A reordered or
inserted field would then fill the wrong slots silently, so their field order is pinned
here: change a record's fields and update its positional call sites together
(stream/core/events.py ``_parse``, stream/core/recommender.py ``learn_one``,
stream/worker/plays.py ``_live``, stream/processing/pipeline.py ``make_write``)."""

from __future__ import annotations

from dataclasses import fields

from stream.core.events import PlayEvent
from stream.core.models.base import Interaction
from stream.processing.documents import PendingWrite
from stream.processing.pipeline import Record


def _names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]  # type: ignore[arg-type]


def test_the_positionally_built_records_keep_their_field_order() -> None:
    assert _names(PlayEvent) == [
        "user_id", "track_id", "ts_ms", "ms_played", "event_id", "track_duration_ms",
        "artist_id", "skipped", "context", "reason_start", "reason_end", "session_id",
        "track_name", "artist_name", "album_name"]
    assert _names(Interaction) == [
        "user_id", "track_id", "ts_ms", "skipped", "history", "session_position",
        "recent_skip_rate", "context", "artist_id", "features"]
    assert _names(Record) == ["topic", "partition", "offset", "key", "value", "timestamp_ms"]
    assert _names(PendingWrite) == [
        "key", "seq", "doc", "notification", "event_ts_ms", "ingest_ts_ms", "enqueued_at",
        "lineage", "fresh"]
