"""Load generators: synthetic listening sessions or a real dataset replay, and a producer that
is always bounded by count AND time, at a target rate or as fast as possible.

Synthetic traffic (labelled ``synthetic`` in every report) models what a music service sees:

- track popularity is Zipf-distributed (``zipf_s`` ~1.0-1.2 matches play-count tails);
- listener activity is heavy-tailed too (a few heavy listeners, a long tail of light ones);
- listening happens in sessions (mean ``session_plays`` tracks, geometric), several listeners
  in session at once; consecutive tracks are often close (same artist / neighbouring track);
- a per-listener skip propensity ~ Beta(2, 5) (mean ~0.29: the ~25-35 % skip share of
  public streaming logs); a skip plays 2-29 s, a full play the track's duration;
- event time advances per listener by what they played; sessions are separated by gaps of at
  least the 30-min session gap (exponential, mean 6 h). Each session carries a ``session_id``,
  so a replay stamped with wall-clock time (``time_mode="now"``) keeps its session structure.

Run ``python -m load_tests.traffic --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

from tqdm import tqdm

from stream.adapters.kafka import ensure_topics, make_producer
from stream.config import Settings, load_settings
from stream.core.events import PlayEvent, encode_event

CONTEXTS = ("playlist", "album", "radio", "search", "artist")
CONTEXT_WEIGHTS = (0.45, 0.2, 0.2, 0.1, 0.05)


@dataclass(frozen=True)
class SessionTraffic:
    """Deterministic (seeded) synthetic listening sessions. Yields :class:`PlayEvent`."""

    users: int = 20_000
    tracks: int = 50_000
    artists: int = 5_000
    zipf_s: float = 1.05
    user_zipf_s: float = 0.8
    concurrent_sessions: int = 500
    session_plays: float = 15.0
    gap_mean_s: float = 6 * 3600.0
    min_gap_s: float = 1800.0
    seed: int = 7
    start_ms: int = 1_760_000_000_000
    prefix: str = "syn"
    #: start sessions with never-seen listeners in order (0, 1, 2, ...) before any returns:
    #: reaches N listeners in ~N sessions (memory scenario)
    sequential_users: bool = False

    def __post_init__(self) -> None:
        if min(self.users, self.tracks, self.artists, self.concurrent_sessions) < 1:
            raise ValueError("users, tracks, artists and concurrent_sessions must be >= 1")
        if self.session_plays < 1:
            raise ValueError("session_plays must be >= 1")

    def events(self, count: int) -> Iterator[PlayEvent]:
        rng = random.Random(self.seed)
        track_cum = _zipf_cdf(self.tracks, self.zipf_s)
        user_cum = _zipf_cdf(self.users, self.user_zipf_s)
        # popularity rank -> track id scrambled, so "popular" is not "low id"
        perm = list(range(self.tracks))
        rng.shuffle(perm)
        propensity: dict[int, float] = {}
        clock: dict[int, int] = {}
        session_no: dict[int, int] = {}
        busy: set[int] = set()
        # active sessions: [user, plays left, last track rank]
        active: list[list[int]] = []
        p = self.prefix

        next_new = [0]

        def start_session() -> list[int]:
            while self.sequential_users and next_new[0] < self.users:
                u = next_new[0]
                next_new[0] += 1
                if u not in busy:
                    break
            else:
                u = -1
            while u < 0:
                u = bisect.bisect_left(user_cum, rng.random())
                if u in busy and len(busy) < self.users:
                    u = -1
            busy.add(u)
            if u not in clock:  # first ever session: spread start times over two weeks
                clock[u] = self.start_ms + rng.randrange(14 * 86_400_000)
                propensity[u] = rng.betavariate(2, 5)
            else:
                gap = self.min_gap_s + rng.expovariate(1.0 / self.gap_mean_s)
                clock[u] += int(gap * 1000)
            session_no[u] = session_no.get(u, 0) + 1
            left = 1 + int(rng.expovariate(1.0 / max(self.session_plays - 1, 1e-9)))
            return [u, left, -1]

        for _ in range(min(self.concurrent_sessions, self.users)):
            active.append(start_session())
        for i in range(count):
            slot = rng.randrange(len(active))
            sess = active[slot]
            u, left, last = sess
            if last >= 0 and rng.random() < 0.45:
                rank = (last + rng.randint(1, 8)) % self.tracks  # a neighbour of the last track
            else:
                rank = bisect.bisect_left(track_cum, rng.random())
            t = perm[rank]
            duration = 120_000 + (t * 7919) % 240_000
            skipped = rng.random() < propensity[u]
            played = rng.randint(2_000, 29_000) if skipped else duration
            ts = clock[u]
            clock[u] = ts + played + rng.randint(0, 3_000)
            user, track = f"{p}-u{u}", f"{p}-t{t}"
            yield PlayEvent(
                user_id=user,
                track_id=track,
                ts_ms=ts,
                ms_played=played,
                event_id=f"{p}-{self.seed}-{i}",
                track_duration_ms=duration,
                artist_id=f"{p}-a{t % self.artists}",
                skipped=skipped,
                context=rng.choices(CONTEXTS, CONTEXT_WEIGHTS)[0],
                reason_end="fwdbtn" if skipped else "trackdone",
                session_id=f"{user}-s{session_no[u]}",
            )
            if left <= 1:
                busy.discard(u)
                active[slot] = start_session()
            else:
                sess[1] = left - 1
                sess[2] = rank


def _zipf_cdf(n: int, s: float) -> list[float]:
    cum: list[float] = []
    total = 0.0
    for r in range(n):
        total += 1.0 / (r + 1) ** s
        cum.append(total)
    return [c / total for c in cum]


def dataset_events(
    source: str, path: str | None = None, limit: int | None = None
) -> list[PlayEvent]:
    """A real log from ``../shared/datasets`` (or ``path``) via :func:`stream.tools.datasets.load_events`."""
    from stream.tools.datasets import default_datasets_dir, load_events

    folder = {
        "movielens": "movielens-100k",
        "lastfm": "lastfm-1k-sample",
        "spotify": "spotify-mssd-sample",
    }.get(source, "")
    return load_events(path or default_datasets_dir() / folder, source, limit=limit)


def make_events(
    source: str,
    count: int,
    *,
    path: str | None = None,
    users: int = 20_000,
    seed: int = 7,
    prefix: str = "syn",
) -> Iterator[PlayEvent]:
    """``count`` events from ``synthetic`` or a dataset (cycled, with fresh event ids, if the
    log is shorter than ``count``)."""
    if source == "synthetic":
        return SessionTraffic(users=users, seed=seed, prefix=prefix).events(count)
    base = dataset_events(source, path, limit=count)
    if len(base) >= count:
        return iter(base[:count])

    def cycled() -> Iterator[PlayEvent]:
        for n, ev in enumerate(itertools.islice(itertools.cycle(base), count)):
            lap = n // len(base)
            yield ev if lap == 0 else replace(ev, event_id=f"{ev.event_id}-r{lap}")

    return cycled()


def source_label(source: str) -> str:
    return "synthetic (SessionTraffic)" if source == "synthetic" else f"real dataset: {source}"


async def produce(
    settings: Settings,
    events: Iterable[PlayEvent],
    *,
    topic: str,
    max_count: int,
    max_seconds: float,
    rate: float | None = None,
    time_mode: str = "now",
    speedup: float = 1.0,
    on_send: Callable[[PlayEvent, float], None] | None = None,
    linger_ms: int = 0,
    progress: bool = True,
    desc: str = "produce",
) -> dict[str, float]:
    """Send events keyed by user id; stop at ``max_count`` events or ``max_seconds``.

    ``rate`` events/s (None: as fast as possible). ``time_mode``: ``now`` stamps each event
    with its send time (wall clock, ms); ``speedup`` replays original inter-event gaps
    compressed by that factor (event times shifted to start now); ``original`` keeps them.
    ``on_send(event, t)`` is called with the wall-clock time just before the send.
    """
    if max_count <= 0 or max_seconds <= 0:
        raise ValueError("max_count and max_seconds must be > 0")
    await ensure_topics(settings.replace(plays_topic=topic))
    producer = make_producer(settings, linger_ms=linger_ms)
    await producer.start()
    sent = 0
    started = time.monotonic()
    base_orig: int | None = None
    base_now = time.time() * 1000
    bar = tqdm(
        total=max_count,
        unit="ev",
        disable=not progress,
        file=sys.stderr,
        desc=desc,
        mininterval=0.5,
    )
    pending: list[asyncio.Future[object]] = []
    try:
        for ev in events:
            if time.monotonic() - started > max_seconds:
                break
            if time_mode == "speedup":
                if base_orig is None:
                    base_orig = ev.ts_ms
                due = (ev.ts_ms - base_orig) / speedup / 1000.0
                ahead = due - (time.monotonic() - started)
                if ahead > 0.001:
                    await asyncio.sleep(min(ahead, max_seconds))
                ev = replace(ev, ts_ms=int(base_now + (ev.ts_ms - base_orig) / speedup))
            now = time.time()
            if time_mode == "now":
                ev = replace(ev, ts_ms=int(now * 1000))
            if on_send is not None:
                on_send(ev, now)
            pending.append(
                await producer.send(topic, value=encode_event(ev), key=ev.user_id.encode())
            )
            sent += 1
            if sent >= max_count:
                break  # before pulling the next event: a shared iterator loses nothing
            if len(pending) >= 2000:
                await asyncio.gather(*pending)
                pending.clear()
            if sent % 200 == 0:
                bar.update(200)
            if rate:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0.001:
                    await asyncio.sleep(ahead)
                elif sent % 64 == 0:
                    await asyncio.sleep(0)  # let the subscriber/sampler tasks run
        await asyncio.gather(*pending)
        await producer.flush()
        bar.update(sent % 200)
    finally:
        bar.close()
        await producer.stop()
    elapsed = time.monotonic() - started
    return {"sent": sent, "seconds": elapsed, "rate": sent / elapsed if elapsed else math.nan}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m load_tests.traffic",
        description="Produce synthetic listening sessions or a dataset replay, bounded by "
        "--count and --seconds.",
    )
    ap.add_argument(
        "--source", choices=("synthetic", "lastfm", "movielens", "spotify"), default="synthetic"
    )
    ap.add_argument("--path", help="dataset file/folder (default ../shared/datasets/...)")
    ap.add_argument("--topic", default=None, help="default: STREAM_PLAYS_TOPIC / plays")
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=None, help="events/s (default: max)")
    ap.add_argument("--time-mode", choices=("now", "speedup", "original"), default="now")
    ap.add_argument(
        "--speedup",
        type=float,
        default=60.0,
        help="with --time-mode speedup: compress the original gaps by this factor",
    )
    ap.add_argument("--users", type=int, default=20_000, help="synthetic listeners")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    settings = load_settings()
    topic = args.topic or settings.plays_topic
    events = make_events(args.source, args.count, path=args.path, users=args.users, seed=args.seed)
    out = asyncio.run(
        produce(
            settings,
            events,
            topic=topic,
            max_count=args.count,
            max_seconds=args.seconds,
            rate=args.rate,
            time_mode=args.time_mode,
            speedup=args.speedup,
            linger_ms=5,
        )
    )
    print(
        f"{source_label(args.source)}: sent {out['sent']:.0f} events to {topic} in "
        f"{out['seconds']:.1f} s ({out['rate']:.0f} events/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
