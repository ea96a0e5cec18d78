"""Track metadata (title, artist, album) the worker has seen, bounded, and the list items
that carry it.

Pure: no Redis. The worker feeds :meth:`TrackCatalog.observe` with every applied play and
:meth:`TrackCatalog.learn` with names read back from the Redis catalogue; it drains
:meth:`take_changes` (first sightings and changed names: written at once, through the
same batched writer as the lists) and :meth:`take_counts` (plays and last-seen time per
track, coalesced and written every few seconds) into Redis ``track:{track_id}`` hashes.

Memory is bounded against hostile input (any producer can send a new 256-character name
with every play): at most ``max_tracks`` entries and ``max_chars`` characters of names,
least recently used first out. A track whose names were dropped is shown by id until it
is played (or read back from Redis) again.

>>> cat = TrackCatalog()
>>> cat.observe("t1", "Karma Police", "Radiohead", None, ts_ms=1000)
True
>>> cat.label("t1")
'Karma Police by Radiohead'
>>> cat.observe("t1", "Karma Police", "Radiohead", None, ts_ms=2000)   # unchanged
False
>>> sorted(cat.take_counts().items())
[('t1', (2, 2000))]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from stream.core.ranking import RankedItem, reason_text
from stream.core.shards import MASK, ShardedLRU


@dataclass(frozen=True, slots=True)
class TrackInfo:
    """Display metadata of a track; any part may be unknown (``None``)."""

    name: str | None = None
    artist: str | None = None
    album: str | None = None

    def chars(self) -> int:
        return sum(len(v) for v in (self.name, self.artist, self.album) if v)

    def label(self) -> str | None:
        """"Name by Artist", "Name", or None when the title is unknown."""
        if not self.name:
            return None
        return f"{self.name} by {self.artist}" if self.artist else self.name


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


class TrackCatalog:
    """Bounded, least-recently-used map of track id -> :class:`TrackInfo`, plus the
    Redis writes it owes (first sightings, changed names, coalesced play counts)."""

    def __init__(
        self, max_tracks: int = 200_000, max_chars: int = 20_000_000, max_wanted: int = 10_000
    ) -> None:
        if max_tracks < 1 or max_chars < 1 or max_wanted < 0:
            raise ValueError("max_tracks and max_chars must be >= 1, max_wanted >= 0")
        self.max_tracks = max_tracks
        self.max_chars = max_chars
        self.max_wanted = max_wanted
        #: least recently used first; in shards (stream.core.shards): as one OrderedDict of
        #: up to 200k names its hash-table growths held the loop 50-69 ms of CPU in the 1M
        #: junk-ids drill (docs/benchmarks.md, "Loop stalls, session 16")
        self._info: ShardedLRU[str, TrackInfo] = ShardedLRU()
        self._chars = 0
        #: track -> (first_seen_ms or None if not a first sighting, info) to write
        self._changes: dict[str, tuple[int | None, TrackInfo]] = {}
        #: track -> (plays since the last drain, last seen ms)
        self._counts: dict[str, tuple[int, int]] = {}
        #: tracks a document wanted a name for and this process does not know
        self._wanted: dict[str, None] = {}
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._info)

    @property
    def chars(self) -> int:
        return self._chars

    def observe(
        self,
        track_id: str,
        name: str | None,
        artist: str | None,
        album: str | None,
        *,
        ts_ms: int,
    ) -> bool:
        """Record one play of ``track_id`` (names as the event carried them; a part the
        event leaves out keeps its known value). Returns whether the Redis catalogue
        needs a metadata write (first sighting here, or a changed name)."""
        count, last = self._counts.get(track_id, (0, ts_ms))
        if count or len(self._counts) < 4 * self.max_tracks:  # bounded between drains
            self._counts[track_id] = (count + 1, max(last, ts_ms))  # plays come out of order
        info = self._info
        h = hash(track_id) & MASK  # info.get, inlined
        shard = info.shards[h]
        known = shard.get(track_id)
        if known is None:
            incoming = TrackInfo(_clean(name), _clean(artist), _clean(album))
            self._put(track_id, incoming)
            self._changes[track_id] = (ts_ms, incoming)
            return True
        # a part the event leaves out keeps its known value (no TrackInfo is built for the
        # usual play of a known track whose names did not change)
        new_name = _clean(name) or known.name
        new_artist = _clean(artist) or known.artist
        new_album = _clean(album) or known.album
        shard.move_to_end(track_id)  # info.move_to_end(track_id), inlined
        info.stamps[h][track_id] = info.next_stamp()
        if new_name == known.name and new_artist == known.artist and new_album == known.album:
            return False
        merged = TrackInfo(new_name, new_artist, new_album)
        self._put(track_id, merged)
        first, _ = self._changes.get(track_id, (None, merged))
        self._changes[track_id] = (first, merged)
        return True

    def learn(self, track_id: str, info: TrackInfo) -> None:
        """Names read back from the Redis catalogue (nothing to write back)."""
        self._wanted.pop(track_id, None)
        if track_id not in self._info or info.chars():
            self._put(track_id, info)

    def upsert(self, track_id: str, info: TrackInfo) -> bool:
        """A metadata-only update (no play): remembered and owed to Redis if it changes
        anything. Returns whether it did."""
        known = self._info.get(track_id)
        if known == info:
            return False
        self._put(track_id, info)
        first, _ = self._changes.get(track_id, (None, info))
        self._changes[track_id] = (first, info)
        return True

    def _put(self, track_id: str, info: TrackInfo) -> None:
        """``info`` for ``track_id``, made the most recent; then the least recent out
        while either bound is passed (never past ``track_id`` itself)."""
        names = self._info
        old = names.get(track_id)
        if old is not None:
            self._chars -= old.chars()
        names.touch(track_id, info)
        self._chars += info.chars()
        while len(names) > self.max_tracks or self._chars > self.max_chars:
            dropped_id, dropped = names.drop_oldest()
            self._chars -= dropped.chars()
            self.evicted += 1
            if dropped_id == track_id:
                break

    def get(self, track_id: str) -> TrackInfo | None:
        """What is known of ``track_id`` here; a track without a known title is noted as
        wanted (the worker asks the Redis catalogue for it, :meth:`take_wanted`: names may
        come from another worker's plays or ``stream catalog load``)."""
        info = self._info.get(track_id)
        if (info is None or info.name is None) and len(self._wanted) < self.max_wanted:
            self._wanted[track_id] = None
        return info

    def label(self, track_id: str) -> str | None:
        info = self.get(track_id)
        return info.label() if info is not None else None

    def take_changes(self) -> dict[str, tuple[int | None, TrackInfo]]:
        """The metadata writes owed: track -> (first-seen ms if first seen here, names)."""
        out, self._changes = self._changes, {}
        return out

    def take_counts(self) -> dict[str, tuple[int, int]]:
        """Plays per track since the last call and the latest play's event time (ms)."""
        out, self._counts = self._counts, {}
        return out

    def give_back_counts(self, counts: dict[str, tuple[int, int]]) -> None:
        """Put back counts taken by :meth:`take_counts` and not written (a flush stopped
        half-way): added to the plays counted since, the later event time kept."""
        for track, (plays, last_ms) in counts.items():
            now = self._counts.get(track)
            self._counts[track] = (
                (plays, last_ms) if now is None else (now[0] + plays, max(now[1], last_ms))
            )

    def take_wanted(self, n: int) -> list[str]:
        """Up to ``n`` tracks a document wanted names for (removed from the wanted set;
        :meth:`learn` or a later :meth:`get` brings them back)."""
        out: list[str] = []
        for track in self._wanted:
            if len(out) >= n:
                break
            out.append(track)
        for track in out:
            del self._wanted[track]
        return out

    # -- documents ------------------------------------------------------------------------

    def items(self, recs: Iterable[RankedItem]) -> list[dict[str, Any]]:
        """The JSON items of a list or a "more like this" document: ``track_id``,
        ``score``, ``reason`` (English, naming tracks by title and artist when known),
        ``reason_code`` and ``reason_track_id`` (for apps that render their own text), and
        ``name`` / ``artist`` / ``album`` when known. ``recs``: recommendations, or
        :data:`stream.core.ranking.RankedItem` tuples (a reason naming an anchor is
        written here either way)."""
        out: list[dict[str, Any]] = []
        reasons: dict[tuple[str, str], str] = {}  # most items share one or two anchors
        shards = self._info.shards
        wanted = self._wanted
        # the fields unpacked (a named tuple's attribute reads cost more), and get()
        # inlined: this runs for every item of every list the worker publishes
        for track, score, reason, code, anchor in recs:
            if anchor is not None:
                key = (code, anchor)
                reason = reasons.get(key) or reasons.setdefault(
                    key, reason_text(code, self.label(anchor) or anchor))
            item: dict[str, Any] = {
                "track_id": track, "score": float(score), "reason": reason,
                "reason_code": code, "reason_track_id": anchor,
            }
            info = shards[hash(track) & MASK].get(track)  # self._info.get, inlined
            if info is None:
                if len(wanted) < self.max_wanted:  # as get(): noted as wanted
                    wanted[track] = None
            else:
                name = info.name
                if name is None:
                    if len(wanted) < self.max_wanted:
                        wanted[track] = None
                else:
                    item["name"] = name
                if info.artist is not None:
                    item["artist"] = info.artist
                if info.album is not None:
                    item["album"] = info.album
            out.append(item)
        return out
