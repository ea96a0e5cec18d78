"""Junk-ids drill: a real worker on the real stack receives plays whose track and user ids
are all new (unique junk, each with its own junk artist id and free-text context), while a
few real Last.fm listeners keep playing. It watches the worker's RSS, its longest
event-loop lag (the worker's own probe, ``stream_event_loop_lag_max_seconds``), the
catalogue and eviction metrics and Redis memory (``INFO memory``), and how fast the real
listeners' lists follow their plays. Writes a JSON report and a PNG plot.

    python -m load_tests.faults junk-ids --count 1000000 --seconds 1500 --report junk.json
    python -m load_tests.faults junk-ids --count 3000 --seconds 90 --max-tracks 1000 \\
        --max-users 500 --report junk-smoke.json     # the CI-sized variant

Bounded by ``--count`` and ``--seconds``. The worker runs with model checkpoints off (a
checkpoint of a 500k-track model would land in the shared Redis every 30 s). The drill's
Redis keys are deleted at the end; its Kafka topics (unique names) are left to the broker's
retention.

Memory caps (see docs/benchmarks.md, "Memory under hostile ids"): the models are bounded
by ``max_tracks`` and ``max_users``, the session table by ``max_sessions`` (least recently
active listeners evicted).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from stream.adapters.kafka import ensure_topics, make_producer
from stream.config import Settings
from stream.core.events import PlayEvent, encode_event
from stream.tools.datasets import default_datasets_dir, load_events

JUNK_CONTEXTS = ("playlist", "Radio", "editorial_playlist")


def _scrape(port: int) -> dict[str, float]:
    """Every sample of the worker's /metrics, summed by name (labels dropped; histogram
    buckets kept apart as ``name|le``)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            name = f"{s.name}|{s.labels['le']}" if "le" in s.labels else s.name
            out[name] = out.get(name, 0.0) + s.value
    return out


class JunkProducer(threading.Thread):
    """Sends ``count`` junk plays at ``rate`` per second (bounded by ``seconds``)."""

    def __init__(self, settings: Settings, tag: str, count: int, rate: float, seconds: float,
                 seed: int) -> None:
        super().__init__(name="junk-producer", daemon=True)
        self.settings, self.tag, self.count = settings, tag, count
        self.rate, self.seconds, self.seed = rate, seconds, seed
        self.sent = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def halt(self) -> None:
        self._halt.set()

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # noqa: BLE001 - reported by the drill
            self.error = exc

    async def _run(self) -> None:
        rng = random.Random(self.seed)
        producer = make_producer(self.settings)
        await producer.start()
        started = time.monotonic()
        topic = self.settings.plays_topic
        try:
            pending = []
            for i in range(self.count):
                if self._halt.is_set() or time.monotonic() - started > self.seconds:
                    break
                user = f"{self.tag}-ju{i}"
                context = (rng.choice(JUNK_CONTEXTS) if rng.random() < 0.5
                           else f"junk-context-{i}")
                event = PlayEvent(user, f"{self.tag}-jt{i}", int(time.time() * 1000),
                                  rng.randint(1_000, 300_000), f"{self.tag}-je{i}",
                                  artist_id=f"{self.tag}-ja{i}", context=context)
                pending.append(await producer.send(topic, value=encode_event(event),
                                                   key=user.encode()))
                self.sent += 1
                if len(pending) >= 500:
                    await asyncio.gather(*pending)
                    pending.clear()
                ahead = self.sent / self.rate - (time.monotonic() - started)
                if ahead > 0.005:
                    await asyncio.sleep(ahead)
            await asyncio.gather(*pending)
        finally:
            await producer.stop()


class RealListeners(threading.Thread):
    """Replays real listeners' plays (their tracks, artists and order; timestamps set at
    sending) at ``rate`` plays per second in total, round robin, and records when each was
    sent: ``sends[user]`` is a list of (seq the worker should reach, monotonic send time)."""

    def __init__(self, settings: Settings, plays: dict[str, list[PlayEvent]], rate: float,
                 seconds: float) -> None:
        super().__init__(name="real-listeners", daemon=True)
        self.settings, self.plays, self.rate, self.seconds = settings, plays, rate, seconds
        self.sends: dict[str, list[tuple[int, float]]] = {u: [] for u in plays}
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def halt(self) -> None:
        self._halt.set()

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # noqa: BLE001 - reported by the drill
            self.error = exc

    async def _run(self) -> None:
        producer = make_producer(self.settings)
        await producer.start()
        started = time.monotonic()
        users = list(self.plays)
        try:
            n = 0
            longest = max(len(p) for p in self.plays.values())
            for i in range(longest):
                for user in users:
                    if i >= len(self.plays[user]):
                        continue
                    if self._halt.is_set() or time.monotonic() - started > self.seconds:
                        return
                    event = replace(self.plays[user][i], ts_ms=int(time.time() * 1000))
                    await producer.send_and_wait(self.settings.plays_topic,
                                                 value=encode_event(event), key=user.encode())
                    with self.lock:
                        self.sends[user].append((i + 1, time.monotonic()))
                    n += 1
                    ahead = n / self.rate - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        finally:
            await producer.stop()


def real_plays(tag: str, datasets_dir: Path, per_user: int) -> dict[str, list[PlayEvent]]:
    """The Last.fm sample's listeners, ids prefixed with the drill's tag, each with their
    first ``per_user`` plays in time order (unique event ids)."""
    events = load_events(datasets_dir / "lastfm-1k-sample", "lastfm")
    out: dict[str, list[PlayEvent]] = {}
    for e in events:
        user = f"{tag}-lfm-{e.user_id}"
        plays = out.setdefault(user, [])
        if len(plays) < per_user:
            plays.append(replace(e, user_id=user, event_id=f"{tag}-r{user}-{len(plays)}"))
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process ``pid`` has used so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def junk_ids(
    settings: Settings,
    start_worker: Any,
    *,
    count: int,
    seconds: float,
    rate: float = 1000.0,
    real_rate: float = 4.0,
    seed: int = 15,
    sample_s: float = 2.0,
    datasets_dir: Path | None = None,
    plot: Path | None = None,
) -> dict[str, Any]:
    """Run the drill (see the module docstring); returns the JSON-ready report."""
    from stream.adapters.redis_store import RecoReader

    tag = settings.redis_prefix.split(":")[0]
    asyncio.run(ensure_topics(settings))
    worker = start_worker(settings)
    assert worker.proc is not None
    pid = worker.proc.pid
    port = settings.metrics_port
    reader = RecoReader(settings.redis_url, password=settings.redis_password,
                        prefix=settings.redis_prefix, similar_prefix=settings.similar_prefix,
                        channel=settings.notify_channel)
    redis = reader.client
    plays = real_plays(tag, datasets_dir or default_datasets_dir(), per_user=100_000)
    junk = JunkProducer(settings, tag, count, rate, seconds, seed)
    real = RealListeners(settings, plays, real_rate, seconds + 60)
    series: list[dict[str, Any]] = []
    latencies: dict[str, list[float]] = {u: [] for u in plays}
    resolved: dict[str, int] = dict.fromkeys(plays, 0)
    #: (sent at, seconds since the drill's start; latency to the list) of every real play
    timeline: list[tuple[float, float]] = []
    t0 = time.monotonic()
    redis_start = int(redis.info("memory")["used_memory"])

    def rss() -> int:
        from load_tests.faults import rss_bytes

        return rss_bytes(pid)

    def poll_real() -> None:
        now = time.monotonic()
        pipe = redis.pipeline(transaction=False)
        users = list(plays)
        for u in users:
            pipe.get(f"{settings.redis_prefix}{u}")
        for u, raw in zip(users, pipe.execute(), strict=True):
            seq = json.loads(raw)["seq"] if raw else 0
            with real.lock:
                sends = real.sends[u]
                while resolved[u] < len(sends) and sends[resolved[u]][0] <= seq:
                    latencies[u].append(now - sends[resolved[u]][1])
                    timeline.append((round(sends[resolved[u]][1] - t0, 2),
                                     round(now - sends[resolved[u]][1], 3)))
                    resolved[u] += 1

    rss_start = rss()
    before = _scrape(port)  # the loop-lag histogram before the drill's traffic
    noise_path = Path(tempfile.mkstemp(prefix="junk-noise-", suffix=".json")[1])
    noise = subprocess.Popen([sys.executable, "-m", "load_tests.junk_ids", "--noise-probe",
                              str(seconds + 180), str(noise_path)])
    real.start()
    junk.start()
    next_sample = 0.0
    deadline = t0 + seconds + 120
    caught_up_at: float | None = None
    try:
        while time.monotonic() < deadline:
            if worker.proc.poll() is not None:
                break
            poll_real()
            elapsed = time.monotonic() - t0
            if elapsed >= next_sample:
                next_sample = elapsed + sample_s
                try:
                    metrics = _scrape(port)
                except OSError:
                    metrics = {}
                processed = metrics.get("stream_events_total", 0.0)
                point = {
                    "t_s": round(elapsed, 1),
                    "junk_sent": junk.sent,
                    "events_applied": int(processed),
                    "rss_mb": round(rss() / 2**20, 1),
                    "worker_cpu_s": round(cpu_seconds(pid), 2),
                    "redis_used_mb": round(int(redis.info("memory")["used_memory"]) / 2**20, 1),
                    "loop_lag_max_ms": round(
                        1000 * metrics.get("stream_event_loop_lag_max_seconds", 0.0), 1),
                    "loop_busy_max_ms": round(
                        1000 * metrics.get("stream_event_loop_busy_max_seconds", 0.0), 1),
                    "catalogue": int(metrics.get("stream_catalogue_tracks", 0.0)),
                    "tracks_evicted": int(metrics.get("stream_tracks_evicted_total", 0.0)),
                    "evictions": int(metrics.get("stream_eviction_seconds_count", 0.0)),
                    "mf_users_evicted": int(metrics.get("stream_mf_users_evicted_total", 0.0)),
                    "active_users": int(metrics.get("stream_session_table_users", 0.0)),
                    "consumer_lag": int(metrics.get("stream_consumer_lag_messages", 0.0)),
                    "rankings_shed": int(metrics.get("stream_rankings_shed_total", 0.0)),
                    "model_memory_mb": round(
                        metrics.get("stream_model_memory_bytes", 0.0) / 2**20, 1),
                }
                series.append(point)
                print(f"[junk-ids] {point['t_s']:>6.0f}s sent {junk.sent:,}/{count:,} "
                      f"applied {point['events_applied']:,} rss {point['rss_mb']} MB "
                      f"redis {point['redis_used_mb']} MB catalogue {point['catalogue']:,} "
                      f"evictions {point['evictions']} loop-lag-max "
                      f"{point['loop_lag_max_ms']} ms (busy {point['loop_busy_max_ms']} ms)",
                      file=sys.stderr, flush=True)
                total_sent = junk.sent + sum(len(s) for s in real.sends.values())
                if not junk.is_alive() and point["events_applied"] >= total_sent:
                    caught_up_at = caught_up_at or elapsed
                    if elapsed - caught_up_at >= 4 * sample_s:
                        break
            time.sleep(0.25)
    finally:
        junk.halt()
        real.halt()
        junk.join(30)
        real.join(30)
    noise.send_signal(signal.SIGTERM)
    noise.wait(10)
    try:
        noise_report = json.loads(noise_path.read_text() or "{}")
    except ValueError:
        noise_report = {}
    noise_path.unlink(missing_ok=True)
    time.sleep(2.0)
    poll_real()
    alive = worker.proc.poll() is None
    final = _scrape(port) if alive else {}
    all_latencies = [x for v in latencies.values() for x in v]
    real_sent = {u: len(s) for u, s in real.sends.items()}
    eviction_count = final.get("stream_eviction_seconds_count", 0.0)
    report: dict[str, Any] = {
        "drill": "junk_ids",
        "junk_requested": count,
        "junk_sent": junk.sent,
        "junk_rate_target": rate,
        "duration_s": round(time.monotonic() - t0, 1),
        "worker_alive": alive,
        "settings": {"max_tracks": settings.max_tracks, "max_users": settings.max_users,
                     "max_recent": settings.max_recent, "max_seen": settings.max_seen},
        "events_applied": int(final.get("stream_events_total", 0.0)),
        "rss_start_mb": round(rss_start / 2**20, 1),
        "rss_peak_mb": max((p["rss_mb"] for p in series), default=None),
        "rss_end_mb": round(rss() / 2**20, 1) if alive else None,
        **_lag_window(before, final),
        **_lag_window(before, final, "busy"),
        "idle_process_loop_lag": noise_report,
        "evictions": int(eviction_count),
        "eviction_mean_ms": round(1000 * final.get("stream_eviction_seconds_sum", 0.0)
                                  / eviction_count, 1) if eviction_count else None,
        "tracks_evicted": int(final.get("stream_tracks_evicted_total", 0.0)),
        "catalogue_end": int(final.get("stream_catalogue_tracks", 0.0)),
        "mf_users_evicted": int(final.get("stream_mf_users_evicted_total", 0.0)),
        "session_table_listeners": int(final.get("stream_session_table_users", 0.0)),
        "redis_used_start_mb": round(redis_start / 2**20, 1),
        "redis_used_peak_mb": max((p["redis_used_mb"] for p in series), default=None),
        "real_listeners": {
            u: {"sent": real_sent[u], "applied_in_redis": resolved[u],
                "latency_p50_s": _round(_percentile(latencies[u], 50)),
                "latency_max_s": _round(max(latencies[u], default=None))}
            for u in plays
        },
        "real_latency_p50_s": _round(_percentile(all_latencies, 50)),
        "real_latency_p99_s": _round(_percentile(all_latencies, 99)),
        "real_latency_max_s": _round(max(all_latencies, default=None)),
        "real_lists_fresh": all(resolved[u] == real_sent[u] for u in plays)
        and (max(all_latencies, default=0.0) <= 5.0),
        "real_latency_timeline": sorted(timeline),
        "producer_errors": [repr(e) for e in (junk.error, real.error) if e is not None],
        "series": series,
    }
    if alive:
        worker.stop()
    print("[junk-ids] deleting the drill's Redis keys ...", file=sys.stderr, flush=True)
    report["redis_keys_deleted"] = _delete_keys(redis, settings)
    reader.close()
    if plot is not None:
        plot_series(series, plot, report)
        report["plot"] = str(plot)
    return report


def _lag_window(before: dict[str, float], after: dict[str, float],
                what: str = "lag") -> dict[str, Any]:
    """The worker's event-loop lag during the drill (not its start-up): the lags observed
    in between, by histogram bucket, and the longest one -- exact when the worker's
    "longest since start" gauge rose during the drill, else bounded by the bucket.
    ``what="busy"``: the same for the CPU time the loop's thread used between two probe
    turns (``stream_event_loop_busy_seconds``: the worker's own work in those lags)."""
    if not after:
        return {f"loop_{what}_max_ms": None, f"loop_{what}_samples": None}
    name = f"stream_event_loop_{what}_seconds"
    counts: dict[float, float] = {}
    for key, value in after.items():
        if key.startswith(f"{name}_bucket|") and not key.endswith("|+Inf"):
            le = float(key.split("|")[1])
            counts[le] = value - before.get(key, 0.0)
    total = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
    bounds = sorted(counts)
    over = {f"over_{int(le * 1000)}ms": int(total - counts[le]) for le in bounds}
    gauge_before = before.get(f"stream_event_loop_{what}_max_seconds", 0.0)
    gauge_after = after.get(f"stream_event_loop_{what}_max_seconds", 0.0)
    if gauge_after > gauge_before:
        longest, exact = gauge_after, True
    else:  # the longest lag in the window is at most the first bucket holding them all
        bound = next((le for le in bounds if counts[le] >= total), float("inf"))
        longest, exact = min(bound, gauge_before), False
    return {f"loop_{what}_max_ms": round(1000 * longest, 1), f"loop_{what}_max_exact": exact,
            f"loop_{what}_samples": int(total), f"loop_{what}_counts": over,
            f"loop_{what}_max_since_worker_start_ms": round(1000 * gauge_after, 1)}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _delete_keys(redis: Any, settings: Settings) -> int:
    deleted = 0
    tag = settings.redis_prefix.split(":")[0]
    # the junk tracks' catalogue entries too (track:{tag}-jt...: a million keys otherwise
    # left in the shared Redis until catalog_ttl_s)
    for pattern in (f"{settings.redis_prefix}*", f"{settings.similar_prefix}*",
                    f"{settings.catalog_prefix}{tag}-*"):
        batch: list[bytes] = []
        for key in redis.scan_iter(match=pattern, count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                deleted += redis.unlink(*batch)
                batch.clear()
        if batch:
            deleted += redis.unlink(*batch)
    return deleted


def plot_series(series: list[dict[str, Any]], path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [p["t_s"] for p in series]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    axes[0].plot(t, [p["rss_mb"] for p in series], label="worker RSS")
    axes[0].plot(t, [p["model_memory_mb"] for p in series], label="models (estimate)")
    axes[0].set_ylabel("MB")
    axes[0].legend()
    axes[1].plot(t, [p["redis_used_mb"] for p in series], color="tab:red")
    axes[1].set_ylabel("Redis used MB")
    axes[2].plot(t, [p["catalogue"] for p in series], label="catalogue tracks")
    axes[2].plot(t, [p["active_users"] for p in series], label="session-table listeners")
    axes[2].plot(t, [p["junk_sent"] for p in series], label="junk plays sent", ls=":")
    axes[2].legend()
    axes[3].plot(t, [p["loop_lag_max_ms"] for p in series], color="tab:green")
    axes[3].axhline(50, color="grey", ls="--", lw=0.8)
    axes[3].set_ylabel("longest loop lag\nsince worker start, ms")
    axes[3].set_xlabel("seconds")
    fig.suptitle(f"junk-ids drill: {report['junk_sent']:,} junk plays, max_tracks="
                 f"{report['settings']['max_tracks']:,}, max_users="
                 f"{report['settings']['max_users']:,}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def drill_settings(base: Settings, *, max_tracks: int | None, max_users: int | None) -> Settings:
    # the stall sampler logs where every loop stall of 40 ms or more was spent
    # (stream.worker.watchdog.StallSampler); the report lists those lines
    changes: dict[str, Any] = {"checkpoint_interval_s": 0.0, "stall_sample_ms": 40.0}
    if max_tracks is not None:
        changes["max_tracks"] = max_tracks
    if max_users is not None:
        changes["max_users"] = max_users
    return base.replace(**changes)


def new_tag() -> str:
    return f"j{uuid.uuid4().hex[:8]}"


def noise_probe(seconds: float, out: Path) -> None:
    """A process that does nothing but run the worker's 10 ms loop-lag probe: the lag the
    machine itself causes (other processes' CPU use) while the drill runs. Writes its
    longest lag and counts over 20 / 50 ms to ``out`` at the end (or on SIGTERM)."""
    from stream.worker.watchdog import LoopLagProbe

    lags: list[float] = []
    probe = LoopLagProbe(on_lag=lags.append)

    def write(*_: object) -> None:
        out.write_text(json.dumps({
            "samples": len(lags), "max_ms": round(1000 * probe.max_lag, 1),
            "over_20ms": sum(x > 0.02 for x in lags), "over_50ms": sum(x > 0.05 for x in lags),
        }))
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, write)

    async def run() -> None:
        task = asyncio.get_running_loop().create_task(probe.run())
        await asyncio.sleep(seconds)
        task.cancel()

    asyncio.run(run())
    write()


def bytes_per_item(n: int = 200_000) -> dict[str, int]:
    """RSS growth per junk play, in-process, for the cap formula: the models with every
    listener keeping MF factors ("track + MF user"), with ``max_users=1`` ("track"), and a
    dict of session states alone ("session state"), each in a fresh process."""
    out: dict[str, int] = {}
    for mode in ("track", "track + MF user", "session state"):
        code = (
            "import gc, sys\n"
            "from load_tests.junk_ids import _rss_growth\n"
            f"print(_rss_growth({mode!r}, {n}))\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True)
        out[mode] = int(done.stdout.strip())
        print(f"[junk-ids] {mode}: {out[mode]} bytes per junk play", file=sys.stderr,
              flush=True)
    return out


def _rss_growth(mode: str, n: int) -> int:
    import gc

    from load_tests.faults import rss_bytes
    from stream.core.recommender import Recommender
    from stream.core.session import update_session

    def event(i: int) -> PlayEvent:
        return PlayEvent(f"j0000000-ju{i}", f"j0000000-jt{i}", 1_700_000_000_000 + i, 100_000,
                         f"j0000000-je{i}", artist_id=f"j0000000-ja{i}",
                         context=f"junk-context-{i}")

    rec = Recommender(seed=0, max_users=1 if mode == "track" else None)
    table: dict[str, Any] = {}
    for i in range(2000):  # warm: first-call allocations out of the measurement
        e = event(10**8 + i)
        rec.learn_one(update_session(None, e), e)
    gc.collect()
    before = rss_bytes(os.getpid())
    for i in range(n):
        e = event(i)
        update = update_session(None, e)
        if mode == "session state":
            table[e.user_id] = update.state
        else:
            rec.learn_one(update, e)
    gc.collect()
    return (rss_bytes(os.getpid()) - before) // n


def _kafka_quota(bootstrap: str, client_id: str, producer_byte_rate: int | None) -> None:
    """Set (or, with None, delete) a broker-side produce quota on a client id with Kafka's
    own ConfigCommand (``kafka-configs.sh``), run from the stack's broker jars."""
    from stream.tools import stack

    libs = stack.StackConfig.from_env().kafka_libs
    change = (["--add-config", f"producer_byte_rate={producer_byte_rate}"]
              if producer_byte_rate is not None else ["--delete-config", "producer_byte_rate"])
    subprocess.run(["java", "-cp", f"{libs}/*", "kafka.admin.ConfigCommand",
                    "--bootstrap-server", bootstrap, "--alter", *change,
                    "--entity-type", "clients", "--entity-name", client_id],
                   check=True, capture_output=True, timeout=180)


def quota_check(settings: Settings, *, byte_rate: int, count: int, seconds: float = 300.0,
                ) -> dict[str, Any]:
    """The defence against a flood above the workers' capacity is the broker's: a produce
    quota (``producer_byte_rate``) on the flooding principal. Sets one on a client id, sends
    ``count`` junk plays from it as fast as the client can (no pacing) to a scratch topic,
    and reports the rate the broker let through (bounded by ``seconds``)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    tag = new_tag()
    client_id, topic = f"{tag}-flood", f"{tag}-quota-plays"
    _kafka_quota(settings.kafka_bootstrap, client_id, byte_rate)

    async def run() -> dict[str, Any]:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 4, 1)])
        finally:
            await admin.close()
        producer = make_producer(settings, client_id=client_id)
        await producer.start()
        sent = size = 0
        started = time.monotonic()
        try:
            pending = []
            for i in range(count):
                if time.monotonic() - started > seconds:
                    break
                user = f"{tag}-ju{i}"
                value = encode_event(PlayEvent(user, f"{tag}-jt{i}", int(time.time() * 1000),
                                               100_000, f"{tag}-je{i}", artist_id=f"{tag}-ja{i}",
                                               context=f"junk-context-{i}"))
                pending.append(await producer.send(topic, value=value, key=user.encode()))
                sent += 1
                size += len(value) + len(user)
                if len(pending) >= 500:
                    await asyncio.gather(*pending)
                    pending.clear()
            await asyncio.gather(*pending)
        finally:
            await producer.stop()
        took = time.monotonic() - started
        return {"client_id": client_id, "producer_byte_rate": byte_rate, "sent": sent,
                "seconds": round(took, 1), "plays_per_s": round(sent / took, 1),
                "payload_bytes_per_play": round(size / max(sent, 1), 1),
                "payload_bytes_per_s": round(size / took)}

    try:
        return asyncio.run(run())
    finally:
        _kafka_quota(settings.kafka_bootstrap, client_id, None)


def _vmstat(*names: str) -> dict[str, int]:
    out = dict.fromkeys(names, 0)
    with open("/proc/vmstat") as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key in out:
                out[key] = int(value)
    return out


def _sync_times(tracks: int) -> dict[str, Any]:
    """In this process: a worker-configured recommender (reserved rows, as the worker)
    learns ``tracks`` junk plays; every ``ImplicitMF._sync`` (new rows' factors, on the
    event loop in the worker) is timed, and the kernel's huge page faults are counted."""
    from stream.config import Settings
    from stream.core.session import update_session
    from stream.worker.app import configure_recommender

    rec = configure_recommender(None, Settings())
    mf = rec.mf
    sync = mf._sync
    times: list[float] = []
    cpu: list[float] = []

    def timed() -> None:  # wall and the thread's CPU (a page fault is the thread's CPU)
        t, c = time.perf_counter(), time.thread_time()
        sync()
        times.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)

    mf._sync = timed  # type: ignore[method-assign]
    before = _vmstat("thp_fault_alloc", "compact_stall")
    started = time.perf_counter()
    for i in range(tracks):
        e = PlayEvent(f"ju{i}", f"jt{i}", 1_700_000_000_000 + i, 100_000, f"je{i}",
                      artist_id=f"ja{i}", context="playlist")
        rec.learn_one(update_session(None, e), e)
    took = time.perf_counter() - started
    after = _vmstat("thp_fault_alloc", "compact_stall")
    import numpy as np

    ms = np.array(times) * 1e3
    cpu_ms = np.array(cpu) * 1e3
    return {
        "tracks": tracks, "learn_s": round(took, 1), "syncs": len(times),
        "sync_max_ms": round(float(ms.max()), 2),
        "sync_p999_ms": round(float(np.percentile(ms, 99.9)), 3),
        "syncs_over_5ms": int((ms > 5).sum()), "syncs_over_20ms": int((ms > 20).sum()),
        "sync_total_over_5ms_ms": round(float(ms[ms > 5].sum()), 1),
        "sync_cpu_max_ms": round(float(cpu_ms.max()), 2),
        "sync_cpu_over_5ms": int((cpu_ms > 5).sum()),
        "sync_cpu_total_over_5ms_ms": round(float(cpu_ms[cpu_ms > 5].sum()), 1),
        "thp_fault_alloc": after["thp_fault_alloc"] - before["thp_fault_alloc"],
        "compact_stall": after["compact_stall"] - before["compact_stall"],
    }


def sync_faults(tracks: int = 500_000) -> dict[str, Any]:
    """``ImplicitMF._sync`` per new track up to ``tracks``, each variant in a fresh process:
    numpy's transparent huge page advice on (``NUMPY_MADVISE_HUGEPAGE=1``: what the worker
    had before session 14) and the worker as it is now (the advice off at start-up:
    :func:`stream.worker.heap.no_transparent_huge_pages`)."""
    out: dict[str, Any] = {}
    for name, env_value in (("huge pages (before)", "1"), ("worker (advice off)", None)):
        env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
        if env_value is not None:
            env["NUMPY_MADVISE_HUGEPAGE"] = env_value
        code = ("import json\nfrom load_tests.junk_ids import _sync_times\n"
                f"print(json.dumps(_sync_times({tracks})))\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, check=True)
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"[junk-ids] {name}: {out[name]}", file=sys.stderr, flush=True)
    return out


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--noise-probe":
        noise_probe(float(sys.argv[2]), Path(sys.argv[3]))
    elif len(sys.argv) == 2 and sys.argv[1] == "--bytes-per-item":
        print(json.dumps(bytes_per_item()))
    elif len(sys.argv) in (2, 3) and sys.argv[1] == "--sync-faults":
        print(json.dumps(sync_faults(*(int(a) for a in sys.argv[2:])), indent=1))
    elif len(sys.argv) == 4 and sys.argv[1] == "--quota-check":
        from load_tests.faults import _drill_settings

        print(json.dumps(quota_check(_drill_settings(new_tag()), byte_rate=int(sys.argv[2]),
                                     count=int(sys.argv[3])), indent=1))
    else:
        raise SystemExit("use: python -m load_tests.faults junk-ids ... | "
                         "python -m load_tests.junk_ids --bytes-per-item | "
                         "python -m load_tests.junk_ids --sync-faults [TRACKS] | "
                         "python -m load_tests.junk_ids --quota-check BYTES_PER_S COUNT")
