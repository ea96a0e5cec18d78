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
>>> decode_signal(encode_signal(sig)) == sig
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import orjson

from stream.events import PlayEvent
from stream.session import SessionUpdate

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


def _from_dict(worker: str, d: dict[str, object]) -> TrackSignal:
    return TrackSignal(
        worker=worker,
        track_id=str(d["t"]),
        ts_ms=int(d["ts"]),  # type: ignore[call-overload]
        skipped=bool(d["s"]),
        history=tuple(str(t) for t in d.get("h") or ())[-HISTORY_SENT:],  # type: ignore[attr-defined]
        artist_id=d.get("a"),  # type: ignore[arg-type]
        context=d.get("c"),  # type: ignore[arg-type]
    )


def encode_signal(sig: TrackSignal) -> bytes:
    """One signal as a batch of one (see :func:`encode_batch`)."""
    return encode_batch(sig.worker, [sig])


def encode_batch(worker: str, sigs: list[TrackSignal]) -> bytes:
    """Many signals from one worker in one message (one Kafka record per flush, not per
    play: the per-message cost is what matters at high rates)."""
    return orjson.dumps({"w": worker, "v": 1, "signals": [_as_dict(s) for s in sigs]})


def decode_batch(raw: bytes) -> tuple[str, list[TrackSignal]]:
    """(worker, signals); malformed entries are skipped (signals are advisory, never fatal)."""
    try:
        d = orjson.loads(raw)
        worker = str(d["w"])
        items = d["signals"]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return "", []
    out: list[TrackSignal] = []
    for item in items if isinstance(items, list) else ():
        try:
            out.append(_from_dict(worker, item))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return worker, out


def decode_signal(raw: bytes) -> TrackSignal | None:
    """The first signal of a message, or None if there is none."""
    _, sigs = decode_batch(raw)
    return sigs[0] if sigs else None


def apply_signal(recommender: object, sig: TrackSignal) -> None:
    """Learn another worker's play on the item side only: trending popularity and session
    co-occurrence (matrix-factorisation factors and the skip model stay local)."""
    from stream.models.base import Interaction

    x = Interaction(
        user_id="",
        track_id=sig.track_id,
        ts_ms=sig.ts_ms,
        skipped=sig.skipped,
        history=sig.history,
        context=sig.context,
        artist_id=sig.artist_id,
    )
    recommender.popularity.learn_one(x)  # type: ignore[attr-defined]
    recommender.cooccurrence.learn_one(x)  # type: ignore[attr-defined]
    if sig.artist_id:
        recommender.artist_of[sig.track_id] = sig.artist_id  # type: ignore[attr-defined]
