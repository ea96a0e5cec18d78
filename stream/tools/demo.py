"""``stream demo``: the main job in one command -- local stack, a worker, and a producer
replaying real plays, printing recommendations as they land in Redis."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path

from stream.adapters.redis_store import RecoReader
from stream.config import Settings, redis_auth
from stream.core.events import PlayEvent
from stream.tools import stack
from stream.tools.producer import dataset_events, produce_events


def _env_for(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_")}
    env.update(
        {f"STREAM_{f.name.upper()}": str(getattr(settings, f.name)) for f in fields(settings)}
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _metric_sum(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=3) as resp:
        text = resp.read().decode()
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name
    )


def _quantile(url: str, name: str, q: float) -> float | None:
    """Quantile estimate from a Prometheus histogram (linear within the bucket)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=3) as resp:
        text = resp.read().decode()
    buckets = sorted(
        (float(s.labels["le"]), s.value)
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == f"{name}_bucket"
    )
    if not buckets or buckets[-1][1] == 0:
        return None
    target = q * buckets[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= target:
            if le == float("inf"):
                return prev_le
            frac = (target - prev_c) / (c - prev_c) if c > prev_c else 0.0
            return prev_le + frac * (le - prev_le)
        prev_le, prev_c = le, c
    return None


def _ready_since(log_path: Path, start: int) -> bool:
    """The worker log says Ready after byte ``start`` (bytes, not text: earlier runs' lines
    hold multi-byte characters, Faust's tables, which would shift a text slice past this
    run's lines)."""
    return b"Worker]: Ready" in log_path.read_bytes()[start:]


def run_demo(
    settings: Settings, *, source: str, count: int, rate: float, keep_running: bool = True
) -> int:
    """Stack up, a detached worker (left running: ``stream stack down`` stops it), a replay
    of real plays, then three listeners' named lists and the commands to explore them.

    ``keep_running`` is accepted for compatibility: the worker always stays up now."""
    del keep_running
    cfg = stack.StackConfig.from_env()
    stack.up(cfg, ["kafka", "redis", "prometheus"])
    run = time.strftime("%Y%m%d-%H%M%S")
    # each demo run gets its own topic and consumer group, so re-running replays afresh
    settings = settings.replace(
        app_id=f"demo-{run}", plays_topic=f"demo-{run}-plays", dlq_topic=f"demo-{run}-dlq"
    )
    if not settings.checkpoint_keys and not settings.checkpoint_secret:
        # a key for this run only (a demo's app id is new each time: nothing to restore)
        settings = settings.replace(checkpoint_keys=f"demo:{secrets.token_hex(16)}")
    log_path = cfg.state_dir / "logs" / "worker.out"
    metrics_url = f"http://{settings.metrics_host}:{settings.metrics_port}/metrics"
    print(f"[demo] starting a detached worker (log: {log_path})", flush=True)
    start_size = log_path.stat().st_size if log_path.exists() else 0
    pid = stack.spawn_worker(cfg, _env_for(settings))
    deadline = time.monotonic() + 180
    while not _ready_since(log_path, start_size):
        if stack.worker_pid(cfg) is None or time.monotonic() > deadline:
            print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
            print("[demo] worker failed to start", file=sys.stderr)
            stack.stop_worker(cfg)
            return 1
        time.sleep(0.3)
    print(f"[demo] worker ready (pid {pid}, app id {settings.app_id}, topic "
          f"{settings.plays_topic}); metrics: {metrics_url}", flush=True)
    reader = RecoReader(
        settings.redis_url,
        **redis_auth(settings),
        prefix=settings.redis_prefix,
        similar_prefix=settings.similar_prefix,
        channel=settings.notify_channel,
        catalog_prefix=settings.catalog_prefix,
    )
    events = dataset_events(source, None, count, "now")
    label = {"movielens": "MovieLens-100K ratings (real listeners; a rating is a play, "
             "titles from ml-100k.item)", "lastfm": "Last.fm 1K sample (real plays, 2 "
             "listeners)", "spotify": "Spotify MSSD sample (real sessions, no names)"}[source]
    print(f"[demo] replaying {count} plays of the {label} at {rate:.0f} plays/s", flush=True)
    try:
        sent = asyncio.run(
            produce_events(settings, events, rate=rate, max_count=count, max_seconds=600)
        )
    except KeyboardInterrupt:
        print("\n[demo] replay interrupted; the worker keeps running", flush=True)
        sent = int(_metric_sum(metrics_url, "stream_events_total"))
    deadline = time.monotonic() + 60
    while _metric_sum(metrics_url, "stream_events_total") < sent and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)  # the last flush
    processed = _metric_sum(metrics_url, "stream_events_total")
    p50 = _quantile(metrics_url, "stream_freshness_seconds", 0.5)
    p99 = _quantile(metrics_url, "stream_freshness_seconds", 0.99)
    print(f"\n[demo] replayed {sent} real {source} plays; the worker applied {processed:.0f}")
    if p50 is not None and p99 is not None:
        print(f"[demo] freshness (play -> visible in Redis): p50 {p50 * 1000:.1f} ms, "
              f"p99 {p99 * 1000:.1f} ms")
    listeners = _busiest_listeners(dataset_events(source, None, count, "original"), 3)
    track = None
    for user in listeners:
        doc = reader.get(user)
        if doc is None:
            continue
        print(f"\n[demo] listener {user} ({doc.session.get('plays_total', '?')} plays):")
        names = reader.tracks([i.track_id for i in doc.items if not i.name])
        for n, item in enumerate(doc.items, 1):
            name = item.name or names.get(item.track_id, {}).get("name") or item.track_id
            artist = item.artist or names.get(item.track_id, {}).get("artist")
            shown = f"{name} by {artist}" if artist else name
            print(f"  {n:>2}. {shown[:60]:<60} {item.reason}")
            track = track or item.track_id
    prom = f"http://127.0.0.1:{cfg.prometheus_port}"
    user = listeners[0] if listeners else "USER"
    print("\n[demo] the worker keeps running (detached, pid "
          f"{stack.worker_pid(cfg) or pid}); explore:")
    top = "stream top" if settings.metrics_port == 8000 else f"stream top --url {metrics_url}"
    print(f"  {top}    # live view of the worker's metrics")
    print(f"  stream recs {user}    # a listener's list (--json: the stored document)")
    print(f"  stream similar {track or 'TRACK'}    # 'more like this' for a track")
    print(f"  {prom}/graph?g0.expr=rate(stream_events_total[1m])   # Prometheus")
    print("[demo] stop the worker and the stack with: stream stack down", flush=True)
    return 0


def _busiest_listeners(events: Iterable[PlayEvent], n: int) -> list[str]:
    """The ``n`` listeners with the most plays among ``events``."""
    return [u for u, _ in Counter(ev.user_id for ev in events).most_common(n)]
