"""The hot path builds these records with positional arguments (keywords cost ~1-2 us a
play in the generated ``__init__``: docs/benchmarks.md, "Session 13: P1"). A reordered or
inserted field would then fill the wrong slots silently, so their field order is pinned
here: change a record's fields and update its positional call sites together
(stream/core/events.py ``_parse``, stream/core/recommender.py ``learn_one``,
stream/worker/plays.py ``_live``, stream/processing/pipeline.py ``make_write`` and
``_learn_and_rank``'s ``Outcome``)."""

from __future__ import annotations

from dataclasses import fields

from stream.core.events import PlayEvent
from stream.core.models.base import Interaction
from stream.processing.documents import PendingWrite
from stream.processing.pipeline import Outcome, Record


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
    assert _names(Outcome) == ["outcome", "event", "update", "recs", "rejection", "model_error",
                               "learned"]
    assert _names(PendingWrite) == [
        "key", "seq", "doc", "notification", "event_ts_ms", "ingest_ts_ms", "enqueued_at",
        "lineage", "fresh"]


def test_each_slot_builder_makes_what_the_constructor_makes() -> None:
    from dataclasses import astuple, dataclass

    import pytest

    from stream.core import events, recommender, session
    from stream.core.recommender import LearnResult
    from stream.core.session import SessionUpdate, UserState
    from stream.core.slots import positional_builder
    from stream.processing import pipeline

    state, before = UserState("u", seq=2), UserState("u", seq=1)
    cases = [
        (events._build_play_event, PlayEvent,
         ("u", "t", 1, 2, "e", 3, "a", True, "radio", "r1", "r2", "s", "n", "ar", "al")),
        (recommender._build_interaction, Interaction,
         ("u", "t", 5, True, ("x", "y"), 3, 0.5, "radio", "a", {"mf": 1.0})),
        (recommender._build_learn_result, LearnResult, (0.25, True, False, None)),
        (session._build_update, SessionUpdate, (state, before, False, True, False, True)),
        (pipeline.build_record, Record, ("plays", 3, 17, b"k", b"v", 1234)),
    ]
    for build, cls, args in cases:
        made, expected = build(*args), cls(*args)
        assert type(made) is cls
        assert made == expected
        if cls not in (Interaction, SessionUpdate):  # hold a dict / UserStates: unhashable
            assert hash(made) == hash(expected)
        assert repr(made) == repr(expected)
        assert all(a is b for a, b in zip(astuple(made), astuple(expected), strict=True)
                   if not isinstance(a, (tuple, dict, UserState)))
        with pytest.raises(TypeError):  # every field, positionally, or nothing
            build(*args[:-1])
        with pytest.raises(AttributeError):  # still frozen
            made.__setattr__(fields(cls)[0].name, None)  # type: ignore[arg-type]

    @dataclass(frozen=True, slots=True)
    class Checked:
        a: int

        def __post_init__(self) -> None:
            raise AssertionError

    @dataclass(frozen=True)
    class Unslotted:
        a: int

    for cls in (Checked, Unslotted):
        with pytest.raises(TypeError):
            positional_builder(cls)
