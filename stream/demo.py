"""``stream demo``: the main job in one command -- local stack, a worker, and a producer
replaying real plays, printing recommendations as they land in Redis."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import fields

from stream import stack
from stream.config import Settings, redis_auth
from stream.producer import dataset_events, produce_events
from stream.store import RecoReader


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


def run_demo(
    settings: Settings, *, source: str, count: int, rate: float, keep_running: bool
) -> int:
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
    log_path = cfg.state_dir / "logs" / f"worker-demo-{run}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_url = f"http://{settings.metrics_host}:{settings.metrics_port}/metrics"
    print(f"[demo] starting worker (log: {log_path})", flush=True)
    with log_path.open("ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "stream.cli", "worker"],
            env=_env_for(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while "Worker]: Ready" not in log_path.read_text(errors="replace"):
            if worker.poll() is not None or time.monotonic() > deadline:
                print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
                print("[demo] worker failed to start", file=sys.stderr)
                return 1
            time.sleep(0.3)
        print(f"[demo] worker ready; metrics: {metrics_url}", flush=True)
        print(f"[demo] Prometheus: http://127.0.0.1:{cfg.prometheus_port}/graph", flush=True)

        reader = RecoReader(
            settings.redis_url,
            **redis_auth(settings),
            prefix=settings.redis_prefix,
            channel=settings.notify_channel,
        )
        stop = threading.Event()
        landed: list[dict[str, object]] = []

        def watch() -> None:
            last_print = 0.0
            while not stop.is_set():
                for note in reader.updates(timeout_s=1.0):
                    landed.append(note)
                    if stop.is_set():
                        return
                    if time.monotonic() - last_print < 2.0:
                        continue
                    last_print = time.monotonic()
                    doc = reader.get(str(note["user_id"]))
                    if doc and doc.items:
                        top = "; ".join(f"{i.track_id[:18]} ({i.reason})" for i in doc.items[:3])
                        lag_ms = doc.generated_at_ms - doc.event_ts_ms
                        print(
                            f"\n[demo] {doc.user_id} play #{doc.seq} -> top-3: {top} "
                            f"[ranked {lag_ms:.0f} ms after the play]",
                            flush=True,
                        )

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        events = dataset_events(source, None, count, "now")
        sent = asyncio.run(
            produce_events(settings, events, rate=rate, max_count=count, max_seconds=600)
        )
        deadline = time.monotonic() + 60
        while (
            _metric_sum(metrics_url, "stream_events_total") < sent and time.monotonic() < deadline
        ):
            time.sleep(0.5)
        time.sleep(0.5)
        stop.set()
        processed = _metric_sum(metrics_url, "stream_events_total")
        p50 = _quantile(metrics_url, "stream_freshness_seconds", 0.5)
        p99 = _quantile(metrics_url, "stream_freshness_seconds", 0.99)
        print(f"\n[demo] replayed {sent} real {source} plays; worker consumed {processed:.0f}")
        print(
            f"[demo] {len(landed)} recommendation updates published on '{settings.notify_channel}'"
        )
        if p50 is not None and p99 is not None:
            print(
                f"[demo] freshness (play -> visible in Redis): p50 {p50 * 1000:.1f} ms, "
                f"p99 {p99 * 1000:.1f} ms"
            )
        if landed:
            user = str(landed[-1]["user_id"])
            print(f"[demo] try: stream recs {user}")
        print("[demo] stop everything with: stream stack down")
        if keep_running:
            print("[demo] worker keeps running; Ctrl-C to stop it", flush=True)
            worker.wait()
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(40)
            except subprocess.TimeoutExpired:
                worker.kill()
