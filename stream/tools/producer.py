"""``stream produce``: replay a real dataset or synthetic listening traffic into the plays
topic, keyed by user id, at a target rate or as fast as possible, bounded by count and time.

Synthetic traffic: Zipf-distributed track popularity, many listeners, sessions separated by
gaps, a per-listener skip propensity. It is labelled synthetic everywhere it is reported.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from tqdm import tqdm

from stream.adapters.kafka import ensure_topics, make_producer
from stream.config import Settings
from stream.core.events import PlayEvent, derive_event_id, encode_event
from stream.tools.datasets import load_events


@dataclass(frozen=True)
class SyntheticTraffic:
    """Deterministic (seeded) synthetic listening traffic."""

    users: int = 1000
    tracks: int = 5000
    artists: int = 500
    zipf_s: float = 1.1
    seed: int = 7
    start_ms: int | None = None

    def events(self, count: int) -> Iterator[PlayEvent]:
        rng = random.Random(self.seed)
        # Zipf over tracks via the inverse-CDF of precomputed weights
        weights = [1.0 / (r + 1) ** self.zipf_s for r in range(self.tracks)]
        cum: list[float] = []
        total = 0.0
        for w in weights:
            total += w
            cum.append(total)
        propensity = [rng.betavariate(2, 5) for _ in range(self.users)]  # mean skip ~0.29
        clock = self.start_ms if self.start_ms is not None else int(time.time() * 1000)
        last_track: list[int | None] = [None] * self.users
        import bisect

        for i in range(count):
            u = (
                min(int(rng.paretovariate(1.2)) - 1, self.users - 1)
                if rng.random() < 0.3
                else rng.randrange(self.users)
            )
            clock += rng.randint(1, 50)
            prev = last_track[u]
            if prev is not None and rng.random() < 0.5:
                # listening sessions have structure: often a neighbour of the last track
                t = (prev + rng.randint(1, 5)) % self.tracks
            else:
                t = bisect.bisect_left(cum, rng.random() * total)
            last_track[u] = t
            skipped = rng.random() < propensity[u]
            duration = 150_000 + (t * 7919) % 150_000
            played = rng.randint(2_000, 29_000) if skipped else duration
            user, track = f"syn-u{u}", f"syn-t{t}"
            yield PlayEvent(
                user_id=user,
                track_id=track,
                ts_ms=clock,
                ms_played=played,
                event_id=derive_event_id(user, track, clock, played) + f"-{i}",
                track_duration_ms=duration,
                artist_id=f"syn-a{t % self.artists}",
                skipped=skipped,
                context=rng.choice(("playlist", "album", "radio", "search")),
            )


def retime(events: Iterable[PlayEvent], speedup: float | None) -> Iterator[PlayEvent]:
    """Shift event times so the first is 'now' (keeping event ids), optionally compressing
    the original gaps by ``speedup``. ``speedup=None`` keeps only the relative order: every
    event gets the wall-clock time at which it is produced."""
    base_orig: int | None = None
    base_now = int(time.time() * 1000)
    for ev in events:
        if speedup is None:
            yield replace(ev, ts_ms=int(time.time() * 1000))
            continue
        if base_orig is None:
            base_orig = ev.ts_ms
        yield replace(ev, ts_ms=base_now + int((ev.ts_ms - base_orig) / speedup))


async def produce_events(
    settings: Settings,
    events: Iterable[PlayEvent | bytes],
    *,
    rate: float | None = None,
    max_count: int | None = None,
    max_seconds: float | None = None,
    progress: bool = True,
    topic: str | None = None,
) -> int:
    """Send events (PlayEvent, or raw bytes for malformed-input tests) keyed by user id.

    Returns the number sent. ``rate`` is events per second (None = as fast as possible).
    """
    await ensure_topics(settings)
    producer = make_producer(settings)
    await producer.start()
    topic = topic or settings.plays_topic
    sent = 0
    started = time.monotonic()
    bar = tqdm(total=max_count, unit="ev", disable=not progress, file=sys.stderr, desc="produce")
    try:
        futures = []
        for item in events:
            if max_count is not None and sent >= max_count:
                break
            if max_seconds is not None and time.monotonic() - started > max_seconds:
                break
            if isinstance(item, PlayEvent):
                key, value = item.user_id.encode(), encode_event(item)
            else:
                key, value = None, item
            futures.append(await producer.send(topic, value=value, key=key))
            sent += 1
            if len(futures) >= 1000:
                await asyncio.gather(*futures)
                futures.clear()
            if sent % 100 == 0:
                bar.update(100)
            if rate:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0.002:
                    await asyncio.sleep(ahead)
        await asyncio.gather(*futures)
        await producer.flush()
        bar.update(sent % 100)
    finally:
        bar.close()
        await producer.stop()
    return sent


def dataset_events(
    source: str, path: str | None, limit: int | None, time_mode: str
) -> Iterable[PlayEvent]:
    if source == "synthetic":
        return SyntheticTraffic().events(limit or 10_000)
    from stream.tools.datasets import default_datasets_dir

    folder = {
        "movielens": "movielens-100k",
        "lastfm": "lastfm-1k-sample",
        "spotify": "spotify-mssd-sample",
        "sessionrec": "30music-200ks",
        "csv": "",
    }[source]
    if path is None:
        if source == "csv":
            raise SystemExit("--path is required for --source csv")
        path = str(default_datasets_dir() / folder)
    events = load_events(path, source, limit=limit)
    if time_mode == "original":
        return events
    return retime(events, None)  # "now": stamped when sent (relative order kept)
