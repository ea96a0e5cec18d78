"""The play-event contract: raw bytes from Kafka -> a validated :class:`PlayEvent`, or a
:class:`Rejection` that says precisely why not.

The parser never raises on input: every possible byte string maps to exactly one of the two
results, so a malformed message can always be routed to the dead-letter topic with its reason.

>>> ev = parse_event(b'{"user_id": "u1", "track_id": "t9", "ts": 1700000000000, "ms_played": 1000}',
...                  now_ms=1700000000000)
>>> ev.user_id, ev.track_id, ev.ts_ms
('u1', 't9', 1700000000000)
>>> parse_event(b'nope', now_ms=0).reason
'not_json'
"""

from __future__ import annotations

import hashlib
import math
import struct
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import orjson

from stream.core.ids import IDS, SHARED_ID_MAX_LEN
from stream.core.ids import canonical as _canonical
from stream.core.shards import MASK as _ID_MASK
from stream.core.slots import positional_builder

#: Bounded set of rejection reasons (used as a Prometheus label, so keep it closed).
REJECTION_REASONS: Final = (
    "oversized",
    "not_utf8",
    "not_json",
    "not_object",
    "missing_field",
    "wrong_type",
    "bad_value",
    "string_too_long",
    "future_timestamp",
    "too_old_timestamp",
    "unknown_field",
    "key_mismatch",
    # the record is not on the partition Kafka's default partitioner gives its key
    # (murmur2(key) mod partitions): a producer chose it, which would split one listener's
    # state (and a forget's reach) over two partitions
    "wrong_partition",
    "control_character",
    "internal_error",
    # authenticated topics (the control topic; stream.processing.control, stream.processing.auth)
    "unsigned",
    "bad_signature",
    "unknown_key",
    "stale",
    "replayed",
    # the control command's nonce could not be checked in Redis (fail closed)
    "nonce_unverified",
)

MAX_EVENT_BYTES: Final = 16 * 1024
MAX_ID_LEN: Final = 256
MAX_TEXT_LEN: Final = 256
#: Events more than this far ahead of the processing clock are rejected.
MAX_FUTURE_MS: Final = 24 * 3600 * 1000
#: Timestamps before 1990 are almost certainly unit mistakes (seconds sent as ms, etc.).
MIN_TS_MS: Final = 631152000000
#: One week of listening is a generous upper bound for a single play.
MAX_MS_PLAYED: Final = 7 * 24 * 3600 * 1000

REQUIRED_FIELDS: Final = ("user_id", "track_id", "ts", "ms_played")
OPTIONAL_FIELDS: Final = (
    "track_duration_ms",
    "artist_id",
    "skipped",
    "context",
    "reason_start",
    "reason_end",
    "session_id",
    "event_id",
    "track_name",
    "artist_name",
    "album_name",
)
_KNOWN_FIELDS: Final = frozenset(REQUIRED_FIELDS + OPTIONAL_FIELDS)


@dataclass(frozen=True, slots=True)
class PlayEvent:
    """One validated play of a track by a listener.

    ``ts_ms`` is the event time in epoch milliseconds. ``skipped`` is ``None`` when the
    producer did not say; :meth:`is_skip` then infers it from the share of the track played.
    """

    user_id: str
    track_id: str
    ts_ms: int
    ms_played: int
    event_id: str
    track_duration_ms: int | None = None
    artist_id: str | None = None
    skipped: bool | None = None
    context: str | None = None
    reason_start: str | None = None
    reason_end: str | None = None
    session_id: str | None = None
    #: display metadata (optional; validated like the other text fields)
    track_name: str | None = None
    artist_name: str | None = None
    album_name: str | None = None

    def is_skip(self, short_play_ms: int = 30_000) -> bool:
        """Explicit skip label if present, else a short play (< 30 s, or < half a short track)."""
        if self.skipped is not None:
            return self.skipped
        limit = short_play_ms
        if self.track_duration_ms:
            limit = min(limit, self.track_duration_ms // 2)
        return self.ms_played < limit

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON-ready form (what :func:`encode_event` writes)."""
        out: dict[str, Any] = {
            "user_id": self.user_id,
            "track_id": self.track_id,
            "ts": self.ts_ms,
            "ms_played": self.ms_played,
            "event_id": self.event_id,
        }
        for name in OPTIONAL_FIELDS:
            if name == "event_id":
                continue
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message is not a valid play event. ``reason`` is one of REJECTION_REASONS."""

    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class InvalidField(Exception):
    """One field broke the contract: ``reason`` (one of REJECTION_REASONS) and ``detail``.
    Raised by the field checks below, which the signals and control parsers share."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


_Invalid = InvalidField

#: Unicode categories never allowed in ids or text fields: controls (NUL, ESC, newline, DEL,
#: C1), format characters (bidi overrides, zero-width, BOM) and line/paragraph separators --
#: they forge log lines, hide text or reorder what an operator sees.
CONTROL_CATEGORIES: Final = frozenset({"Cc", "Cf", "Zl", "Zp"})


def has_control_character(text: str) -> bool:
    r"""Whether ``text`` holds a character of :data:`CONTROL_CATEGORIES`.

    >>> [has_control_character(t) for t in ("radio", "a\x1b[2J", "\u202eevil")]
    [False, True, True]
    """
    if text.isprintable():  # the fast path: printable text has none of them
        return False
    return any(unicodedata.category(c) in CONTROL_CATEGORIES for c in text)


def escape_text(text: object, limit: int = 200) -> str:
    r"""A value safe to put in a log line: control characters escaped (``repr`` style),
    cut to ``limit`` characters.

    >>> print(escape_text("u1\nFAKE LOG LINE"))
    'u1\nFAKE LOG LINE'
    """
    return repr(str(text)[:limit])


def derive_event_id(user_id: str, track_id: str, ts_ms: int, ms_played: int) -> str:
    """A stable idempotency key for events that carry none: same play -> same id."""
    raw = f"{user_id}\x1f{track_id}\x1f{ts_ms}\x1f{ms_played}".encode()
    return hashlib.blake2b(raw, digest_size=12).hexdigest()


def encode_event(event: PlayEvent | dict[str, Any]) -> bytes:
    """Serialise an event (or a raw dict) as the JSON bytes producers put on the topic."""
    data = event.to_dict() if isinstance(event, PlayEvent) else event
    return orjson.dumps(data)


def parse_event(
    raw: bytes | bytearray | memoryview | None,
    *,
    now_ms: int,
    max_bytes: int = MAX_EVENT_BYTES,
    max_future_ms: int = MAX_FUTURE_MS,
    allow_unknown_fields: bool = True,
) -> PlayEvent | Rejection:
    """Validate raw message bytes. Never raises: returns a PlayEvent or a Rejection.

    ``now_ms`` is the processing clock (passed in so the core stays deterministic).
    """
    try:
        return _parse(raw, now_ms, max_bytes, max_future_ms, allow_unknown_fields)
    except _Invalid as exc:
        return Rejection(exc.reason, exc.detail)
    except (RecursionError, MemoryError, ValueError, TypeError, OverflowError) as exc:
        # Defensive: any corner the explicit checks missed is still a clean rejection.
        return Rejection("bad_value", f"{type(exc).__name__}: {str(exc)[:200]}")


def _parse(
    raw: bytes | bytearray | memoryview | None,
    now_ms: int,
    max_bytes: int,
    max_future_ms: int,
    allow_unknown_fields: bool,
) -> PlayEvent:
    if raw is None:
        raise _Invalid("not_json", "empty message (null value)")
    data = bytes(raw)
    if len(data) > max_bytes:
        raise _Invalid("oversized", f"payload is {len(data)} bytes, limit is {max_bytes}")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Invalid("not_utf8", f"invalid UTF-8 at byte {exc.start}") from None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise _Invalid("not_json", f"invalid JSON: {str(exc)[:160]}") from None
    if not isinstance(obj, dict):
        raise _Invalid("not_object", f"top-level JSON is {_type_name(obj)}, expected an object")
    for name in REQUIRED_FIELDS:
        if name not in obj or obj[name] is None:
            raise _Invalid("missing_field", f"required field '{name}' is missing")
    if not allow_unknown_fields:
        unknown = sorted(set(obj) - _KNOWN_FIELDS)
        if unknown:
            raise _Invalid("unknown_field", f"unknown field(s): {', '.join(unknown[:5])}")

    user_id = _id_field(obj, "user_id")
    track_id = _id_field(obj, "track_id")
    ts_ms = _timestamp(obj["ts"])
    if ts_ms < MIN_TS_MS:
        raise _Invalid("too_old_timestamp", f"'ts' {ts_ms} ms is before 1990; seconds sent as ms?")
    if ts_ms > now_ms + max_future_ms:
        ahead_h = (ts_ms - now_ms) / 3_600_000
        raise _Invalid("future_timestamp", f"'ts' is {ahead_h:.1f} h ahead of the processing clock")
    ms_played = _int_field(obj, "ms_played", 0, MAX_MS_PLAYED)
    duration = _opt_int_field(obj, "track_duration_ms", 1, MAX_MS_PLAYED)
    skipped = obj.get("skipped")
    if skipped is not None and not isinstance(skipped, bool):
        raise _Invalid("wrong_type", f"'skipped' must be a boolean, got {_type_name(skipped)}")
    raw_event_id = obj.get("event_id")
    # unique per play: nothing else holds it, so no shared copy (junk would only fill IDS)
    event_id = None if raw_event_id is None else check_id(raw_event_id, "event_id", share=False)
    if event_id is None:
        event_id = derive_event_id(user_id, track_id, ts_ms, ms_played)
    # positional, in field order (user_id, track_id, ts_ms, ms_played, event_id,
    # track_duration_ms, artist_id, skipped, context, reason_start, reason_end, session_id,
    # track_name, artist_name, album_name): matching 15 keywords cost ~2 us of every play,
    # and the frozen __init__ another ~1 us against the slot builder (stream.core.slots)
    return _build_play_event(
        user_id,
        track_id,
        ts_ms,
        ms_played,
        event_id,
        duration,
        _opt_id_field(obj, "artist_id"),
        skipped,
        _opt_text_field(obj, "context"),
        _opt_text_field(obj, "reason_start"),
        _opt_text_field(obj, "reason_end"),
        _opt_id_field(obj, "session_id", share=False),  # kept only while its session lasts
        _opt_text_field(obj, "track_name"),
        _opt_text_field(obj, "artist_name"),
        _opt_text_field(obj, "album_name"),
    )


_build_play_event: Final = positional_builder(PlayEvent)
_ID_TABLES: Final = IDS.tables
_ID_SHARE: Final = IDS.share
_trim_ids: Final = IDS.trim


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


def _id_field(obj: dict[str, Any], name: str) -> str:
    return check_id(obj[name], name)


def check_id(value: object, name: str, max_len: int = MAX_ID_LEN, *, share: bool = True) -> str:
    """An id (string or integer) as a string, or :class:`InvalidField`: non-empty, printable,
    unpadded, at most ``max_len`` characters. Ids repeat, so the string returned is the
    process's shared one (:data:`stream.core.ids.IDS`), unless ``share`` is false (ids unique
    per message: event ids, nonces)."""
    if type(value) is str:  # the common case first: no str() copy, one type check
        text = value
    elif isinstance(value, bool) or not isinstance(value, str | int):
        raise _Invalid(
            "wrong_type", f"'{name}' must be a string or integer, got {_type_name(value)}"
        )
    elif isinstance(value, int) and not -(10**max_len) < value < 10**max_len:
        raise _Invalid("string_too_long", f"'{name}' is an integer of over {max_len} digits")
    else:
        text = str(value)
    if len(text) > max_len:
        raise _Invalid("string_too_long", f"'{name}' is {len(text)} chars, limit is {max_len}")
    if not text or text.strip() != text or not text.isprintable():
        if has_control_character(text):
            raise _Invalid("control_character", f"'{name}' holds a control character")
        raise _Invalid("bad_value", f"'{name}' must be non-empty printable text without padding")
    if not share or len(text) > SHARED_ID_MAX_LEN:
        return text
    table = _ID_TABLES[hash(text) & _ID_MASK]  # IDS.canonical(text), inlined
    found = table.setdefault(text, text)
    if found is text and len(table) > _ID_SHARE:
        _trim_ids(table, text)
    return found


def _opt_id_field(obj: dict[str, Any], name: str, *, share: bool = True) -> str | None:
    if obj.get(name) is None:
        return None
    return check_id(obj[name], name, share=share)


def _opt_text_field(obj: dict[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    return check_text(value, name)


def check_text(value: object, name: str) -> str:
    """A free-text field (``context``, ``reason_*``), or :class:`InvalidField`: a string of
    at most MAX_TEXT_LEN characters without control characters."""
    if not isinstance(value, str):
        raise _Invalid("wrong_type", f"'{name}' must be a string, got {_type_name(value)}")
    if len(value) > MAX_TEXT_LEN:
        raise _Invalid(
            "string_too_long", f"'{name}' is {len(value)} chars, limit is {MAX_TEXT_LEN}"
        )
    if has_control_character(value):
        raise _Invalid("control_character", f"'{name}' holds a control character")
    # contexts and reasons come from small vocabularies: share one string per value
    return _canonical(value) if len(value) <= 32 else value


def _int_field(obj: dict[str, Any], name: str, lo: int, hi: int) -> int:
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid("wrong_type", f"'{name}' must be a number, got {_type_name(value)}")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise _Invalid("bad_value", f"'{name}' must be a whole number, got {value!r}")
        value = int(value)
    if not lo <= value <= hi:
        raise _Invalid("bad_value", f"'{name}' = {value} is outside [{lo}, {hi}]")
    return value


def _opt_int_field(obj: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    if obj.get(name) is None:
        return None
    return _int_field(obj, name, lo, hi)


def _timestamp(value: object) -> int:
    """Epoch milliseconds (int/float) or an ISO-8601 string with a timezone -> epoch ms."""
    if isinstance(value, bool):
        raise _Invalid("wrong_type", "'ts' must be epoch milliseconds or ISO-8601, got boolean")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise _Invalid("bad_value", f"'ts' must be finite, got {value!r}")
        if abs(value) > 10**15:
            raise _Invalid("bad_value", f"'ts' {value} is not a plausible epoch-ms timestamp")
        return int(value)
    if isinstance(value, str):
        if len(value) > 64:
            raise _Invalid("string_too_long", "'ts' string is longer than 64 chars")
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise _Invalid("bad_value", f"'ts' is not ISO-8601: {value[:40]!r}") from None
        if parsed.tzinfo is None:
            raise _Invalid("bad_value", "'ts' ISO-8601 string needs a timezone (e.g. 'Z')")
        return int(parsed.timestamp() * 1000)
    raise _Invalid(
        "wrong_type", f"'ts' must be epoch milliseconds or ISO-8601, got {_type_name(value)}"
    )


def parse_track_metadata(obj: dict[str, Any]) -> tuple[str, str | None, str | None, str | None]:
    """``track_id`` and the optional ``track_name``/``artist_name``/``album_name`` of a
    metadata record (``stream catalog load``), validated as in a play event. Raises
    ``ValueError`` naming the field.

    >>> parse_track_metadata({"track_id": "t1", "track_name": "Karma Police"})
    ('t1', 'Karma Police', None, None)
    """
    try:
        if obj.get("track_id") is None:
            raise _Invalid("missing_field", "required field 'track_id' is missing")
        return (
            _id_field(obj, "track_id"),
            _opt_text_field(obj, "track_name"),
            _opt_text_field(obj, "artist_name"),
            _opt_text_field(obj, "album_name"),
        )
    except _Invalid as exc:
        raise ValueError(f"{exc.reason}: {exc.detail}") from None


# --------------------------------------------------------------------------- partitions


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash of a record key (``org.apache.kafka.common.utils.Utils``), as
    an unsigned 32-bit integer.

    >>> murmur2(b"21"), murmur2(b"")
    (3321034988, 275646681)
    """
    m, length = 0x5BD1E995, len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    whole = length & ~3
    for (k,) in struct.iter_unpack("<I", data[:whole]):
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    extra = length & 3
    if extra == 3:
        h ^= data[whole + 2] << 16
    if extra >= 2:
        h ^= data[whole + 1] << 8
    if extra >= 1:
        h ^= data[whole]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    return h ^ (h >> 15)


#: murmur2 of the keys seen last (a listener's plays repeat their key; the pure-Python
#: hash was ~3-8 us of every play's decode stage), emptied when it holds this many
KEY_HASH_CACHE: Final = 65_536
_key_hashes: dict[bytes, int] = {}


def key_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (Java and aiokafka) gives a keyed record:
    ``toPositive(murmur2(key)) % partitions``."""
    if type(key) is not bytes:  # e.g. a bytearray: not hashable, not cached
        return (murmur2(key) & 0x7FFFFFFF) % partitions
    hashes = _key_hashes
    h = hashes.get(key)
    if h is None:
        if len(hashes) >= KEY_HASH_CACHE:
            hashes.clear()
        h = hashes[key] = murmur2(key) & 0x7FFFFFFF
    return h % partitions


def partition_problem(key: bytes, partition: int, partitions: int | None) -> Rejection | None:
    """A ``wrong_partition`` rejection if a keyed record is not on its key's partition
    (checked only when ``partitions`` is known)."""
    if not partitions:
        return None
    expected = key_partition(key, partitions)
    if partition == expected:
        return None
    return Rejection(
        "wrong_partition",
        f"record is on partition {partition}, its key hashes to partition {expected} "
        f"of {partitions}",
    )
