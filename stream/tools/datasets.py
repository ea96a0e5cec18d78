"""Loaders that turn the real interaction logs into :class:`PlayEvent` streams.

Formats (the full public files are accepted unchanged, not only the shipped samples):

- ``movielens``: RecBole's ``ml-100k.inter`` (tab-separated, typed header) or the original
  ``u.data`` (tab-separated, no header). A rating is treated as a play; rating <= 2 as a skip.
  MovieLens has no play durations: ``ms_played`` is *derived* (rating / 5 of a nominal 200 s).
- ``lastfm``: the Last.fm 1K log (``userid-timestamp-artid-artname-traid-traname.tsv``, no
  header). Track id = track MBID, or a stable hash of artist + title when the MBID is empty.
  Last.fm logs no durations either: ``ms_played`` is *derived* from the gap to the user's next
  play (capped at 10 minutes); a gap under 30 s counts as a skip.
- ``spotify``: the Spotify MSSD training log (CSV with its 21 columns). There is no user id:
  each listening session stands for a listener. The event time is the session date + hour,
  plus one second per position. ``skipped`` is the challenge label ``skip_2``.
- ``sessionrec``: the session-rec toolkit's preprocessed form (e.g. ``30music-200ks``):
  tab-separated with header ``UserId SessionId ItemId Time ArtistId`` (``Time`` in unix
  seconds). A folder is read file by file in name order (``*_test.0.txt``, ``.1``, ...) as
  one stream. Rows repeated verbatim on consecutive lines (same user, session, track and
  second) are dropped and counted (:func:`load_sessionrec`). The given session ids are kept
  verbatim as ``session_id``. No
  durations are logged: ``ms_played`` is *derived* from the gap to the listener's next play
  in the same session (capped at 10 minutes; the last play of a session gets a nominal
  200 s), and a gap under 30 s counts as a skip, as for Last.fm.
- ``csv``: a generic CSV with header ``user_id,item_id,timestamp`` (unix seconds), optional
  ``skipped``, ``ms_played``, ``duration_ms``, ``artist_id``, ``context``, ``track_name``,
  ``artist_name``, ``album_name``.

Names: MovieLens events carry the movie title (``track_name``, from ``ml-100k.item`` or
``u.item`` next to the ratings), Last.fm ones the track and artist names of the log; the
Spotify MSSD log has no names.

All loaders return events sorted stably by event time (ties keep file order), so replays
are reproducible.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from stream.core.events import PlayEvent, derive_event_id

FORMATS: Final = ("movielens", "lastfm", "spotify", "sessionrec", "csv")
SESSIONREC_COLUMNS: Final = ("UserId", "SessionId", "ItemId", "Time", "ArtistId")
NOMINAL_TRACK_MS: Final = 200_000
LASTFM_MAX_PLAY_MS: Final = 600_000


class DatasetError(ValueError):
    """The file does not look like the format it was said to be."""


def default_datasets_dir() -> Path:
    """``$STREAM_DATASETS_DIR``, else ``../shared/datasets`` next to the project checkout."""
    env = os.environ.get("STREAM_DATASETS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


def resolve_path(path: str | Path, fmt: str) -> Path:
    """Accept a file, or the dataset's folder (the well-known file name is filled in)."""
    p = Path(path)
    if p.is_dir() and fmt == "sessionrec":
        return p  # every file of the folder, in name order (see _sessionrec_files)
    if p.is_dir():
        names = {
            "movielens": ("ml-100k.inter", "u.data"),
            "lastfm": ("userid-timestamp-artid-artname-traid-traname.tsv",),
            "spotify": ("log_sample.csv",),
            "sessionrec": (),
            "csv": (),
        }[fmt]
        for name in names:
            if (p / name).exists():
                return p / name
        candidates = sorted(p.glob("*.csv" if fmt in ("spotify", "csv") else "*"))
        files = [c for c in candidates if c.is_file()]
        if len(files) == 1:
            return files[0]
        raise DatasetError(f"{p}: no {fmt} file found in this folder")
    if not p.exists():
        raise DatasetError(f"{p}: no such file")
    return p


def load_events(path: str | Path, fmt: str, limit: int | None = None) -> list[PlayEvent]:
    """Load a whole log as events sorted stably by time (``limit`` keeps the first N)."""
    if fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "sessionrec":
        events, _ = load_sessionrec(path, limit=limit)
        return events
    file = resolve_path(path, fmt)
    reader = {"movielens": _movielens, "lastfm": _lastfm, "spotify": _spotify, "csv": _csv}[fmt]
    events = list(reader(file))
    events.sort(key=lambda e: e.ts_ms)  # list.sort is stable: ties keep file order
    return events[:limit] if limit is not None else events


def load_sessionrec(
    path: str | Path, limit: int | None = None
) -> tuple[list[PlayEvent], int]:
    """A session-rec log (a file, or every file of a folder in name order) as events sorted
    stably by time, and how many verbatim consecutive copies were dropped.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "x.txt").write_text("UserId\tSessionId\tItemId\tTime\tArtistId\n"
    ...     "1\t7\t10\t100\t3\n1\t7\t10\t100\t3\n1\t7\t11\t160\t3\n")
    >>> events, dropped = load_sessionrec(d)
    >>> [(e.user_id, e.session_id, e.track_id, e.ms_played) for e in events], dropped
    ([('1', '7', '10', 60000), ('1', '1:7', '11', 200000)], 1)
    """
    rows: list[tuple[str, str, str, int, str]] = []
    dropped = 0
    for file in _sessionrec_files(path):
        previous: tuple[str, ...] | None = None
        with file.open(encoding="utf-8") as fh:
            header = tuple(fh.readline().rstrip("\n").split("\t"))
            if header[:5] != SESSIONREC_COLUMNS:
                raise DatasetError(
                    f"{file}: expected the header {' '.join(SESSIONREC_COLUMNS)}, got "
                    f"{' '.join(header)[:200]!r}"
                )
            for lineno, line in enumerate(fh, start=2):
                parts = tuple(line.rstrip("\n").split("\t"))
                if len(parts) < 5:
                    if line.strip():
                        raise DatasetError(f"{file}:{lineno}: expected 5 tab-separated columns")
                    continue
                if parts == previous:
                    dropped += 1
                    continue
                previous = parts
                user, session, item, ts, artist = parts[:5]
                try:
                    ts_ms = int(float(ts) * 1000)
                except ValueError:
                    raise DatasetError(
                        f"{file}:{lineno}: Time {ts[:40]!r} is not a number"
                    ) from None
                rows.append((user, session, item, ts_ms, artist))
    # durations from the gap to the same listener's next play of the same session
    order = sorted(range(len(rows)), key=lambda i: (rows[i][0], rows[i][3], i))
    played = [NOMINAL_TRACK_MS] * len(rows)
    for a, b in zip(order, order[1:], strict=False):
        if rows[a][0] == rows[b][0] and rows[a][1] == rows[b][1]:
            played[a] = max(0, min(rows[b][3] - rows[a][3], LASTFM_MAX_PLAY_MS))
    events = [
        _event(user, item, ts_ms, played[i], artist_id=artist or None,
               skipped=played[i] < 30_000, session_id=session)
        for i, (user, session, item, ts_ms, artist) in enumerate(rows)
    ]
    events.sort(key=lambda e: e.ts_ms)
    return (events[:limit] if limit is not None else events), dropped


def _sessionrec_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        if not files:
            raise DatasetError(f"{p}: no sessionrec files in this folder")
        return files
    if not p.exists():
        raise DatasetError(f"{p}: no such file")
    return [p]


def _event(user: str, track: str, ts_ms: int, ms_played: int, **extra: object) -> PlayEvent:
    eid = derive_event_id(user, track, ts_ms, ms_played)
    return PlayEvent(user, track, ts_ms, ms_played, eid, **extra)  # type: ignore[arg-type]


def movielens_titles(file: Path) -> dict[str, str]:
    """Movie titles next to a MovieLens ratings file: RecBole's ``ml-100k.item``
    (tab-separated, typed header) or the original ``u.item`` (``|``-separated, Latin-1).
    Empty when neither is there."""
    out: dict[str, str] = {}
    recbole = file.with_suffix(".item")
    original = file.with_name("u.item")
    if recbole.is_file():
        with recbole.open(encoding="utf-8", errors="replace") as fh:
            header = fh.readline().rstrip("\n").split("\t")
            col = next((i for i, h in enumerate(header) if h.startswith("movie_title")), 1)
            for line in fh:
                parts = line.rstrip("\n").split("\t")
                if len(parts) > col and parts[col].strip():
                    out[parts[0]] = parts[col].strip()[:256]
    elif original.is_file():
        with original.open(encoding="latin-1") as fh:
            for line in fh:
                parts = line.split("|")
                if len(parts) > 1 and parts[1].strip():
                    out[parts[0]] = parts[1].strip()[:256]
    return out


def _movielens(file: Path) -> Iterator[PlayEvent]:
    titles = movielens_titles(file)
    with file.open(encoding="utf-8") as fh:
        first = fh.readline()
        if ":" not in first.split("\t")[0]:
            fh.seek(0)  # original u.data: no header
        for lineno, line in enumerate(fh, start=2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 4:
                if line.strip():
                    raise DatasetError(f"{file}:{lineno}: expected 4 tab-separated columns")
                continue
            user, item, rating, ts = parts[0], parts[1], float(parts[2]), float(parts[3])
            yield _event(
                user,
                item,
                int(ts * 1000),
                int(NOMINAL_TRACK_MS * min(rating, 5.0) / 5.0),
                track_duration_ms=NOMINAL_TRACK_MS,
                skipped=rating <= 2,
                track_name=titles.get(item),
            )


def _lastfm(file: Path) -> Iterator[PlayEvent]:
    rows: list[tuple[str, int, str, str, str, str]] = []
    with file.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 6:
                if line.strip():
                    raise DatasetError(f"{file}:{lineno}: expected 6 tab-separated columns")
                continue
            user, ts, artist_id, artist, track_mbid, title = parts[:6]
            ts_ms = int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)
            if track_mbid:
                track = track_mbid
            else:
                key = f"{artist_id or artist}\x1f{title}".encode()
                track = "lfm-" + hashlib.blake2b(key, digest_size=8).hexdigest()
            rows.append((user, ts_ms, track, artist_id or artist[:200] or "unknown",
                         title.strip()[:256], artist.strip()[:256]))
    rows.sort(key=lambda r: (r[0], r[1]))
    for i, (user, ts_ms, track, artist, title, artist_name) in enumerate(rows):
        nxt = rows[i + 1] if i + 1 < len(rows) and rows[i + 1][0] == user else None
        played = min(nxt[1] - ts_ms, LASTFM_MAX_PLAY_MS) if nxt else NOMINAL_TRACK_MS
        yield _event(user, track, ts_ms, max(played, 0), artist_id=artist, skipped=played < 30_000,
                     track_name=title or None, artist_name=artist_name or None)


def _parse_day(text: str) -> datetime:
    for fmt in ("%Y-%m-%d", "%d-%m-%y"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    raise DatasetError(f"unrecognised Spotify date {text!r}")


def _spotify(file: Path) -> Iterator[PlayEvent]:
    with file.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"session_id", "session_position", "track_id_clean", "skip_2", "date", "hour_of_day"}
        missing = need - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{file}: not a Spotify MSSD log, missing {sorted(missing)}")
        for row in reader:
            day = _parse_day(row["date"])
            ts_ms = int(day.timestamp() * 1000) + int(row["hour_of_day"]) * 3_600_000
            ts_ms += int(row["session_position"]) * 1000
            skipped = row["skip_2"].strip().lower() == "true"
            yield _event(
                row["session_id"],
                row["track_id_clean"],
                ts_ms,
                15_000 if skipped else NOMINAL_TRACK_MS,
                skipped=skipped,
                context=row.get("context_type") or None,
                reason_start=row.get("hist_user_behavior_reason_start") or None,
                reason_end=row.get("hist_user_behavior_reason_end") or None,
                session_id=row["session_id"],
            )


def _csv(file: Path) -> Iterator[PlayEvent]:
    with file.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"user_id", "item_id", "timestamp"} - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{file}: CSV header lacks {sorted(missing)}")
        for lineno, row in enumerate(reader, start=2):
            try:
                ts_ms = int(float(row["timestamp"]) * 1000)
                duration = int(float(row["duration_ms"])) if row.get("duration_ms") else None
                played = int(float(row["ms_played"])) if row.get("ms_played") else None
            except ValueError as exc:
                raise DatasetError(f"{file}:{lineno}: {exc}") from None
            skipped_text = (row.get("skipped") or "").strip().lower()
            skipped = skipped_text in ("1", "true", "yes") if skipped_text else None
            if played is None:
                played = 15_000 if skipped else (duration or NOMINAL_TRACK_MS)
            yield _event(
                row["user_id"],
                row["item_id"],
                ts_ms,
                played,
                track_duration_ms=duration,
                skipped=skipped,
                artist_id=row.get("artist_id") or None,
                context=row.get("context") or None,
                track_name=row.get("track_name") or None,
                artist_name=row.get("artist_name") or None,
                album_name=row.get("album_name") or None,
            )
