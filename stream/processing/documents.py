"""The Redis document formats, in one place: a listener's list, a track's "more like this"
list and the update notification. Pure (JSON bytes in and out): the pipeline builds them,
:mod:`stream.adapters.redis_store` writes and reads them.

- ``{redis_prefix}{user_id}`` (default ``reco:u42``): a listener's list, :func:`encode_document`::

    {"user_id": "u42", "seq": 17, "lineage": "stream-reco", "k": 10, "model_version": "...",
     "generated_at": 1700000000123, "event_ts": 1700000000000, "event_id": "...",
     "session": {"session_id": "u42#3", "session_plays": 4, "sessions_total": 3,
                 "plays_total": 17, "skips_total": 5, "skip_streak": 0},
     "items": [{"track_id": "t1", "score": 0.42, "reason": "because you played Airbag by
                Radiohead", "reason_code": "played", "reason_track_id": "t9",
                "name": "Let Down", "artist": "Radiohead"}, ...]}

  (``name``/``artist``/``album`` only when known; JSON Schema in
  ``configs/schemas/recommendations.schema.json``). ``seq`` is the listener's count of
  applied plays: the writer's guard refuses a lower one (:class:`PendingWrite` carries it).
- the notification published on ``notify_channel`` for every accepted list:
  ``{"user_id", "seq", "event_id", "event_ts", "generated_at"}``.
- ``{similar_prefix}{track_id}`` (default ``similar:t1``): :func:`encode_similar`,
  ``{"track_id", "k", "model_version", "generated_at", "items"}``.

Readers parse a list with :meth:`RecoDocument.from_json`.

>>> doc, note = encode_document(user_id="u1", seq=3, items=[], generated_at_ms=2,
...                             event_ts_ms=1, event_id="e1", model_version="m")
>>> RecoDocument.from_json(doc).seq, note
(3, b'{"user_id":"u1","seq":3,"event_id":"e1","event_ts":1,"generated_at":2}')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from stream.core.session import UserState


@dataclass(frozen=True, slots=True)
class PendingWrite:
    """A recommendation document waiting for the next flush."""

    key: str
    seq: int
    doc: bytes
    notification: bytes
    event_ts_ms: int
    ingest_ts_ms: int | None
    enqueued_at: float
    #: whose state ``seq`` counts (the app id; also inside ``doc``): the guard compares within it
    lineage: str = ""
    #: False for a re-publication of an older play (after a crash replay): not a freshness sample
    fresh: bool = True


def session_summary(state: UserState) -> dict[str, Any]:
    """The ``session`` object of a listener's list."""
    return {
        "session_id": state.session_key,
        "session_plays": state.session_plays,
        "sessions_total": state.sessions_total,
        "plays_total": state.plays_total,
        "skips_total": state.skips_total,
        "skip_streak": state.skip_streak,
    }


def encode_document(
    *,
    user_id: str,
    seq: int,
    items: Sequence[Any],
    generated_at_ms: int,
    event_ts_ms: int,
    event_id: str,
    model_version: str,
    session: dict[str, Any] | None = None,
    lineage: str = "",
) -> tuple[bytes, bytes]:
    """A listener's list and its pub/sub notification. ``items`` are JSON-ready dicts
    (:meth:`stream.core.catalog.TrackCatalog.items`) or objects with track_id/score/reason."""
    doc = {
        "user_id": user_id,
        "seq": seq,
        "lineage": lineage,
        "k": len(items),
        "model_version": model_version,
        "generated_at": generated_at_ms,
        "event_ts": event_ts_ms,
        "event_id": event_id,
        "session": session or {},
        "items": [
            it if isinstance(it, dict)  # built with names and reason codes (stream.core.catalog)
            else {"track_id": it.track_id, "score": float(it.score), "reason": it.reason}
            for it in items
        ],
    }
    note = {
        "user_id": user_id,
        "seq": seq,
        "event_id": event_id,
        "event_ts": event_ts_ms,
        "generated_at": generated_at_ms,
    }
    return orjson.dumps(doc), orjson.dumps(note)


def encode_similar(
    track_id: str, items: list[dict[str, Any]], *, model_version: str, generated_at_ms: int
) -> bytes:
    """A track's "more like this" list (``items`` as :func:`encode_document`'s)."""
    return orjson.dumps(
        {
            "track_id": track_id,
            "k": len(items),
            "model_version": model_version,
            "generated_at": generated_at_ms,
            "items": items,
        }
    )


@dataclass(frozen=True, slots=True)
class RecoItem:
    track_id: str
    score: float
    reason: str
    reason_code: str | None = None
    reason_track_id: str | None = None
    name: str | None = None
    artist: str | None = None
    album: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecoItem:
        return cls(
            d["track_id"], float(d["score"]), d["reason"], d.get("reason_code"),
            d.get("reason_track_id"), d.get("name"), d.get("artist"), d.get("album"),
        )


@dataclass(frozen=True, slots=True)
class RecoDocument:
    """A listener's list as a reader sees it."""

    user_id: str
    seq: int
    items: list[RecoItem]
    generated_at_ms: int
    event_ts_ms: int
    event_id: str
    model_version: str
    session: dict[str, Any]

    @classmethod
    def from_json(cls, raw: bytes | str) -> RecoDocument:
        d = orjson.loads(raw)
        return cls(
            user_id=d["user_id"],
            seq=int(d["seq"]),
            items=[RecoItem.from_dict(i) for i in d["items"]],
            generated_at_ms=int(d["generated_at"]),
            event_ts_ms=int(d["event_ts"]),
            event_id=d["event_id"],
            model_version=d.get("model_version", ""),
            session=d.get("session", {}),
        )
