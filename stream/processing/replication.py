"""What one worker tells the others about tracks: compact, item-side learning signals.

Listeners are partitioned across workers (the Kafka way), so each worker sees only its
listeners' plays. Item-side knowledge -- what is trending, what is played after what -- must
still reflect everyone. After learning from a play, the owning worker publishes a
:class:`TrackSignal` (no user id: the track, the tracks played before it in the session,
skip flag, time, artist, context) to the signals topic; every worker reads all partitions of
that topic (no consumer group: a broadcast) and applies other workers' signals to its
item-side models (trending popularity and session co-occurrence). User-side state never
leaves its owner. Pure: no I/O here.

>>> sig = TrackSignal("w1", "t9", 1_700_000_000_000, False, ("t1", "t2"), "a1", "radio")
>>> decode_signal(encode_signal(sig), now_ms=1_700_000_000_000) == sig
True
>>> bad = (b'{"w": "w2", "signals": [{"t": "t1", "ts": 1e301, "s": false},'
...        b' {"t": "t2", "ts": 1700000000000, "s": false, "a": {"x": 1}}]}')
>>> decode_batch(bad, now_ms=1_700_000_000_000).rejected
['wrong_type', 'wrong_type']

Messages are validated (:func:`decode_batch`) before anything reaches a model, and are
authenticated by the worker (:mod:`stream.processing.auth`, purpose ``b"signals"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import orjson

from stream.core.events import (
    MAX_FUTURE_MS,
    MIN_TS_MS,
    REJECTION_REASONS,
    InvalidField,
    PlayEvent,
    check_id,
    check_text,
)
from stream.core.session import SessionUpdate

if TYPE_CHECKING:
    from stream.core.recommender import Recommender

#: how many preceding tracks travel with a signal (co-occurrence windows are shorter)
HISTORY_SENT: Final = 8


@dataclass(frozen=True, slots=True)
class TrackSignal:
    worker: str
    track_id: str
    ts_ms: int
    skipped: bool
    history: tuple[str, ...]
    artist_id: str | None = None
    context: str | None = None


def signal_from(worker: str, update: SessionUpdate, event: PlayEvent) -> TrackSignal:
    history = tuple(update.before.recent[-HISTORY_SENT:]) if update.before.recent else ()
    return TrackSignal(
        worker=worker,
        track_id=event.track_id,
        ts_ms=event.ts_ms,
        skipped=update.is_skip,
        history=history,
        artist_id=event.artist_id,
        context=event.context,
    )


def _as_dict(sig: TrackSignal) -> dict[str, object]:
    return {
        "t": sig.track_id,
        "ts": sig.ts_ms,
        "s": sig.skipped,
        "h": list(sig.history),
        "a": sig.artist_id,
        "c": sig.context,
    }


#: the most signals one message may carry (the sender chunks by this many)
MAX_SIGNALS_PER_MESSAGE: Final = 1000
#: the largest signals message read (1,000 signals with long ids and a full history)
MAX_SIGNAL_BYTES: Final = 1024 * 1024
MAX_WORKER_ID_LEN: Final = 64

#: why a signal (or a whole message) was dropped: the play-event reasons of the fields
#: plus "too_many_signals" and the authentication ones (stream.processing.auth.AUTH_REASONS)
SIGNAL_REJECTION_REASONS: Final = (
    *REJECTION_REASONS,
    "too_many_signals",
)


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """What one signals message held: the sender, its valid signals, and one rejection
    reason per dropped entry (or one for the whole message when it is unusable)."""

    worker: str
    signals: list[TrackSignal]
    rejected: list[str]


def _from_dict(worker: str, d: object, now_ms: int, max_future_ms: int) -> TrackSignal:
    """One entry, validated as strictly as a play's fields (stream.core.events), or
    :class:`InvalidField`."""
    if not isinstance(d, dict):
        raise InvalidField("not_object", "a signal must be a JSON object")
    for name in ("t", "ts", "s"):
        if d.get(name) is None:
            raise InvalidField("missing_field", f"signal field '{name}' is missing")
    track = check_id(d["t"], "t")
    ts = d["ts"]
    if type(ts) is not int:
        raise InvalidField("wrong_type", "signal 'ts' must be an integer (epoch ms)")
    if ts < MIN_TS_MS:
        raise InvalidField("too_old_timestamp", f"signal 'ts' {ts} is before 1990")
    if ts > now_ms + max_future_ms:
        raise InvalidField("future_timestamp", "signal 'ts' is ahead of the processing clock")
    skipped = d["s"]
    if type(skipped) is not bool:
        raise InvalidField("wrong_type", "signal 's' must be a boolean")
    raw_history = d.get("h")
    if raw_history is None:
        raw_history = []
    if not isinstance(raw_history, list):
        raise InvalidField("wrong_type", "signal 'h' must be an array of track ids")
    if len(raw_history) > HISTORY_SENT:
        raise InvalidField("bad_value", f"signal 'h' has over {HISTORY_SENT} entries")
    history = tuple(check_id(t, "h") for t in raw_history)
    artist = d.get("a")
    context = d.get("c")
    return TrackSignal(
        worker=worker,
        track_id=track,
        ts_ms=ts,
        skipped=skipped,
        history=history,
        artist_id=None if artist is None else check_id(artist, "a"),
        context=None if context is None else check_text(context, "c"),
    )


def encode_signal(sig: TrackSignal) -> bytes:
    """One signal as a batch of one (see :func:`encode_batch`)."""
    return encode_batch(sig.worker, [sig])


def encode_batch(worker: str, sigs: list[TrackSignal]) -> bytes:
    """Many signals from one worker in one message (one Kafka record per flush, not per
    play: the per-message cost is what matters at high rates)."""
    return orjson.dumps({"w": worker, "v": 1, "signals": [_as_dict(s) for s in sigs]})


def decode_batch(
    raw: bytes | None, *, now_ms: int, max_future_ms: int = MAX_FUTURE_MS
) -> DecodedBatch:
    """Validate a signals message; never raises. Every entry passes the limits of a play
    (ids printable and at most 256 characters, timestamps from 1990 to ``max_future_ms``
    ahead of ``now_ms``, strict types); a bad entry is dropped (its reason listed), the
    others are kept. A message that is not a JSON object with a valid sender and a list of
    at most MAX_SIGNALS_PER_MESSAGE entries yields no signal and one reason."""
    try:
        return _decode(raw, now_ms, max_future_ms)
    except InvalidField as exc:
        return DecodedBatch("", [], [exc.reason])
    except (RecursionError, MemoryError, ValueError, TypeError, OverflowError):
        return DecodedBatch("", [], ["bad_value"])


def _decode(raw: bytes | None, now_ms: int, max_future_ms: int) -> DecodedBatch:
    if not raw:
        raise InvalidField("not_json", "empty signals message")
    if len(raw) > MAX_SIGNAL_BYTES:
        raise InvalidField("oversized", f"signals message over {MAX_SIGNAL_BYTES} bytes")
    try:
        d = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidField("not_json", "signals message is not JSON") from None
    if not isinstance(d, dict):
        raise InvalidField("not_object", "signals message must be a JSON object")
    if d.get("w") is None or d.get("signals") is None:
        raise InvalidField("missing_field", "signals message needs 'w' and 'signals'")
    worker = check_id(d["w"], "w", MAX_WORKER_ID_LEN)
    items = d["signals"]
    if not isinstance(items, list):
        raise InvalidField("wrong_type", "'signals' must be an array")
    if len(items) > MAX_SIGNALS_PER_MESSAGE:
        raise InvalidField("too_many_signals", f"over {MAX_SIGNALS_PER_MESSAGE} signals")
    out: list[TrackSignal] = []
    rejected: list[str] = []
    for item in items:
        try:
            out.append(_from_dict(worker, item, now_ms, max_future_ms))
        except InvalidField as exc:
            rejected.append(exc.reason)
    return DecodedBatch(worker, out, rejected)


def decode_signal(raw: bytes, now_ms: int) -> TrackSignal | None:
    """The first valid signal of a message, or None if there is none."""
    sigs = decode_batch(raw, now_ms=now_ms).signals
    return sigs[0] if sigs else None


def apply_signal(recommender: Recommender, sig: TrackSignal) -> None:
    """Learn another worker's play on the item side only: trending popularity and session
    co-occurrence (matrix-factorisation factors and the skip model stay local)."""
    from stream.core.models.base import Interaction

    x = Interaction(
        user_id="",
        track_id=sig.track_id,
        ts_ms=sig.ts_ms,
        skipped=sig.skipped,
        history=sig.history,
        context=sig.context,
        artist_id=sig.artist_id,
    )
    recommender.learn_item_side(x)
