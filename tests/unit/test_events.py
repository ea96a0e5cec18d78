"""The play-event contract: parsing, validation and its reasons."""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.core.events import (
    MAX_EVENT_BYTES,
    REJECTION_REASONS,
    PlayEvent,
    Rejection,
    derive_event_id,
    encode_event,
    parse_event,
)

NOW = 1_700_000_000_000
GOOD = {"user_id": "u1", "track_id": "t1", "ts": NOW - 1000, "ms_played": 180_000}


def parse(obj: object, **kw: object) -> PlayEvent | Rejection:
    raw = obj if isinstance(obj, bytes) else orjson.dumps(obj)
    return parse_event(raw, now_ms=NOW, **kw)  # type: ignore[arg-type]


def test_minimal_event_parses_with_derived_stable_id() -> None:
    ev = parse(GOOD)
    assert isinstance(ev, PlayEvent)
    assert (ev.user_id, ev.track_id, ev.ts_ms, ev.ms_played) == ("u1", "t1", NOW - 1000, 180_000)
    assert ev.event_id == derive_event_id("u1", "t1", NOW - 1000, 180_000)
    assert parse(GOOD).event_id == ev.event_id  # stable


def test_full_event_and_round_trip() -> None:
    full = GOOD | {
        "track_duration_ms": 200_000,
        "artist_id": "a1",
        "skipped": False,
        "context": "playlist",
        "reason_start": "fwdbtn",
        "reason_end": "trackdone",
        "session_id": "s1",
        "event_id": "e-1",
    }
    ev = parse(full)
    assert isinstance(ev, PlayEvent)
    assert ev.event_id == "e-1" and ev.context == "playlist" and ev.skipped is False
    again = parse_event(encode_event(ev), now_ms=NOW)
    assert again == ev


def test_iso_timestamps_and_integer_ids() -> None:
    ev = parse(GOOD | {"ts": "2023-11-14T22:13:19Z", "user_id": 42})
    assert isinstance(ev, PlayEvent)
    assert ev.ts_ms == 1_700_000_000 * 1000 - 1000 and ev.user_id == "42"
    ev2 = parse(GOOD | {"ts": "2023-11-14T23:13:19+01:00"})
    assert isinstance(ev2, PlayEvent) and ev2.ts_ms == ev.ts_ms


@pytest.mark.parametrize(
    ("raw", "reason", "needle"),
    [
        (b"", "not_json", "invalid JSON"),
        (b"nope", "not_json", "invalid JSON"),
        (b"\xff\xfe", "not_utf8", "UTF-8"),
        (b"[1]", "not_object", "array"),
        (b"null", "not_object", "null"),
        (orjson.dumps({"user_id": "u"}), "missing_field", "track_id"),
        (orjson.dumps(GOOD | {"ms_played": None}), "missing_field", "ms_played"),
        (orjson.dumps(GOOD | {"user_id": ["x"]}), "wrong_type", "user_id"),
        (orjson.dumps(GOOD | {"user_id": True}), "wrong_type", "user_id"),
        (orjson.dumps(GOOD | {"ms_played": "100"}), "wrong_type", "ms_played"),
        (orjson.dumps(GOOD | {"ms_played": -1}), "bad_value", "ms_played"),
        (orjson.dumps(GOOD | {"ms_played": 1.5}), "bad_value", "whole number"),
        (orjson.dumps(GOOD | {"skipped": "yes"}), "wrong_type", "skipped"),
        (orjson.dumps(GOOD | {"context": 3}), "wrong_type", "context"),
        (orjson.dumps(GOOD | {"user_id": " u1"}), "bad_value", "printable"),
        (orjson.dumps(GOOD | {"user_id": ""}), "bad_value", "non-empty"),
        (orjson.dumps(GOOD | {"track_id": "x" * 300}), "string_too_long", "track_id"),
        (orjson.dumps(GOOD | {"context": "x" * 300}), "string_too_long", "context"),
        (orjson.dumps(GOOD | {"ts": NOW + 3 * 86_400_000}), "future_timestamp", "ahead"),
        (orjson.dumps(GOOD | {"ts": 1_700_000_000}), "too_old_timestamp", "seconds sent as ms"),
        (orjson.dumps(GOOD | {"ts": "tomorrow"}), "bad_value", "ISO-8601"),
        (orjson.dumps(GOOD | {"ts": "2023-11-14T22:13:19"}), "bad_value", "timezone"),
        (orjson.dumps(GOOD | {"ts": True}), "wrong_type", "boolean"),
        (b'{"user_id": "u1", "track_id": "t1", "ts": 1, "ms_played": NaN}', "not_json", "JSON"),
        (b"x" * (MAX_EVENT_BYTES + 1), "oversized", "limit"),
        (b"[" * 10_000 + b"]" * 10_000, "oversized", "limit"),
    ],
)
def test_rejections_carry_precise_reasons(raw: bytes, reason: str, needle: str) -> None:
    result = parse_event(raw, now_ms=NOW)
    assert isinstance(result, Rejection)
    assert result.reason == reason
    assert needle in result.detail


def test_deep_nesting_within_size_limit_is_rejected_not_raised() -> None:
    raw = b"[" * 5000 + b"]" * 5000
    result = parse_event(raw, now_ms=NOW)
    assert isinstance(result, Rejection) and result.reason in ("not_json", "not_object")


def test_unknown_fields_allowed_by_default_but_can_be_strict() -> None:
    assert isinstance(parse(GOOD | {"extra": 1}), PlayEvent)
    strict = parse(GOOD | {"extra": 1}, allow_unknown_fields=False)
    assert isinstance(strict, Rejection) and strict.reason == "unknown_field"


def test_is_skip_uses_label_else_short_play() -> None:
    base = PlayEvent("u", "t", NOW, 10_000, "e")
    assert base.is_skip()
    assert not PlayEvent("u", "t", NOW, 10_000, "e", skipped=False).is_skip()
    assert not PlayEvent("u", "t", NOW, 40_000, "e").is_skip()
    assert PlayEvent("u", "t", NOW, 14_000, "e", track_duration_ms=40_000).is_skip()
    assert not PlayEvent("u", "t", NOW, 21_000, "e", track_duration_ms=40_000).is_skip()


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_raise_and_rejections_have_reasons(raw: bytes) -> None:
    result = parse_event(raw, now_ms=NOW)
    assert isinstance(result, PlayEvent | Rejection)
    if isinstance(result, Rejection):
        assert result.reason in REJECTION_REASONS
        assert result.detail


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "user_id": json_values,
            "track_id": json_values,
            "ts": json_values | st.integers(min_value=0, max_value=2 * NOW),
            "ms_played": json_values,
            "skipped": json_values,
            "context": json_values,
            "event_id": json_values,
        },
    )
)
def test_arbitrary_json_objects_parse_or_reject_with_reason(obj: dict[str, object]) -> None:
    result = parse_event(orjson.dumps(obj), now_ms=NOW)
    if isinstance(result, Rejection):
        assert result.reason in REJECTION_REASONS and result.detail
    else:
        assert result.user_id and result.track_id
        assert result.ts_ms <= NOW + 86_400_000
        assert result.ms_played >= 0 and not math.isnan(result.ms_played)


# --------------------------------------------------------------------------- control characters

#: characters that forge log lines or hide/reorder text: C0/C1 controls, DEL, bidi overrides
#: and isolates, zero-width and BOM format characters, line/paragraph separators
CONTROL_CHARS = [
    "\x00", "\x1b", "\n", "\r", "\t", "\x7f", "\x85", "\u202e", "\u2066", "\u200b",
    "\ufeff", "\u2028", "\u2029",
]


@pytest.mark.parametrize("char", CONTROL_CHARS, ids=lambda c: f"U+{ord(c):04X}")
@pytest.mark.parametrize(
    "field", ["user_id", "track_id", "artist_id", "session_id", "event_id", "context",
              "reason_start", "reason_end"]
)
def test_control_characters_are_rejected_in_ids_and_text_fields(field: str, char: str) -> None:
    result = parse(GOOD | {field: f"ab{char}cd"})
    assert isinstance(result, Rejection), (field, char)
    assert result.reason == "control_character" and field in result.detail
    assert char not in result.detail  # the detail never echoes the character


def test_printable_unicode_text_is_still_accepted() -> None:
    ev = parse(GOOD | {"context": "caf\u00e9 \u00a0mix \U0001f3b5", "track_id": "\u05e9\u05dc"})
    assert isinstance(ev, PlayEvent) and ev.context == "caf\u00e9 \u00a0mix \U0001f3b5"


_CONTROL = st.sampled_from(CONTROL_CHARS)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["user_id", "track_id", "context", "reason_end", "artist_id"]),
    st.text(max_size=40),
    _CONTROL,
    st.text(max_size=40),
)
def test_any_text_with_a_control_character_is_rejected(
    field: str, before: str, char: str, after: str
) -> None:
    result = parse(GOOD | {field: before + char + after})
    assert isinstance(result, Rejection)
    assert result.reason == "control_character" and field in result.detail


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=60))
def test_accepted_text_fields_never_hold_control_characters(text: str) -> None:
    import unicodedata

    result = parse(GOOD | {"context": text, "track_id": text})
    if isinstance(result, PlayEvent):
        for value in (result.context, result.track_id):
            assert value is not None
            assert not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in value)
