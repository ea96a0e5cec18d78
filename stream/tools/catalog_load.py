"""``stream catalog load FILE``: a metadata-only upsert of track names into the Redis
catalogue (``{catalog_prefix}{track_id}`` hashes), without a play.

Formats (chosen by the file's suffix; anything but ``.csv`` is read as JSON lines):

- CSV with a header naming ``track_id`` and any of ``name``, ``artist``, ``album``
  (``track_name``, ``artist_name``, ``album_name`` are accepted too);
- JSON lines: one object per line with ``track_id`` and any of the same keys.

Every record is validated like a play event's fields (ids up to 256 printable chars, names
up to 256 chars); a bad record stops the load with its line number, before anything is
written. Workers read the names back when a list needs them (within about a second of the
next ranking that lists the track).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from stream.config import Settings, redis_auth
from stream.core.events import parse_track_metadata
from stream.errors import StreamError

_ALIASES = {"name": "track_name", "artist": "artist_name", "album": "album_name"}
MAX_RECORDS = 5_000_000


class CatalogFileError(StreamError):
    """A catalogue file that cannot be loaded (its line is named)."""


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            if "track_id" not in (reader.fieldnames or ()):
                raise CatalogFileError(f"{path}: the CSV header has no 'track_id' column")
            for lineno, row in enumerate(reader, start=2):
                yield lineno, {k: (v or None) for k, v in row.items() if k}
        return
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise CatalogFileError(f"{path}:{lineno}: not JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise CatalogFileError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, obj


def read_catalog_file(path: str | Path) -> list[tuple[str, str | None, str | None, str | None]]:
    """Validated (track_id, name, artist, album) records of a catalogue file."""
    p = Path(path)
    if not p.is_file():
        raise CatalogFileError(f"{p}: no such file")
    out: list[tuple[str, str | None, str | None, str | None]] = []
    for lineno, obj in _records(p):
        if len(out) >= MAX_RECORDS:
            raise CatalogFileError(f"{p}: more than {MAX_RECORDS} records; split the file")
        record = {_ALIASES.get(k, k): v for k, v in obj.items()}
        try:
            out.append(parse_track_metadata(record))
        except ValueError as exc:
            raise CatalogFileError(f"{p}:{lineno}: {exc}") from None
    return out


def load_catalog_file(settings: Settings, path: str | Path, chunk: int = 1000) -> int:
    """Upsert the names of ``path`` into Redis (pipelined, ``chunk`` tracks per round
    trip; each hash's expiry set to ``catalog_ttl_s``). Returns how many tracks."""
    from stream.adapters.redis_store import connect_sync

    records = read_catalog_file(path)
    # connect_sync: the cluster client too when the Redis mode says so (redis_auth carries it)
    client = connect_sync(settings.redis_url, socket_timeout=10, **redis_auth(settings))
    try:
        for start in range(0, len(records), chunk):
            pipe = client.pipeline(transaction=False)
            for track, name, artist, album in records[start : start + chunk]:
                key = f"{settings.catalog_prefix}{track}"
                fields = {k: v for k, v in (("name", name), ("artist", artist),
                                           ("album", album)) if v}
                if fields:
                    pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
                pipe.expire(key, settings.catalog_ttl_s)
            pipe.execute()
    finally:
        client.close()
    return len(records)
