"""Fault drills against the real stack: crash loop, Redis outage, broker restart, hostile input.

Each drill runs real ``stream worker`` processes and returns a JSON-ready report. The CI
variants (tests/integration/test_reliability.py) call the same functions with short
parameters and assert on the report; the long variants run from here::

    python -m load_tests.faults crash-loop --kills 10 --report crash.json
    python -m load_tests.faults redis-outage --outage-s 30 --report outage.json
    python -m load_tests.faults broker-restart --down-s 10 --report broker.json
    python -m load_tests.faults hostile --count 10000 --report hostile.json
    python -m load_tests.faults junk-ids --count 1000000 --seconds 1500 --report junk.json
    python -m load_tests.faults all --report faults.json
    python -m load_tests.faults attacks [--short] --report attacks.json   (load_tests.attacks)
    python -m load_tests.faults redis-failover --rate 300 --report failover.json  # Redis Cluster
    python -m load_tests.faults kafka-leader-kill --rate 300 --report leader.json  # 3 brokers
    python -m load_tests.faults rebalance-storm --rate 300 --report storm.json  # 3 workers
    python -m load_tests.faults recovery --users 100000 --report recovery.json  # stores/standby

Redis outages and broker restarts use PRIVATE instances (own ports and state dir) started via
:mod:`stream.tools.stack`; the shared stack on 9092/6379 is only used, never stopped. Every loop
is bounded by count and time.

What "exactly once in user state" means here: every produced event has a unique event id;
after the drill, each listener's Redis document has ``seq == session.plays_total ==`` the
number of distinct events produced for that listener. ``lost`` sums the shortfalls,
``double_applied`` the excess.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from stream.adapters.kafka import ensure_topics, make_producer, read_topic
from stream.adapters.redis_store import RecoReader
from stream.config import Settings, load_settings
from stream.core.events import PlayEvent, Rejection, parse_event
from stream.tools import stack
from stream.tools.producer import SyntheticTraffic


class DrillFailed(Exception):
    """A drill could not run (worker never ready, service would not start)."""


# --------------------------------------------------------------------------- workers


class Worker(Protocol):
    """What a drill needs from a worker process (tests pass their ``WorkerProcess``)."""

    proc: subprocess.Popen[bytes] | None

    def kill(self) -> None: ...

    def stop(self, timeout: float = ...) -> int: ...

    def metric_value(self, name: str, **labels: str) -> float: ...

    def log_text(self) -> str: ...


StartWorker = Callable[[Settings], Worker]

#: Faust reads these from the environment (stream/worker/app.py does not set them). A SIGKILLed worker
#: never leaves its consumer group: its partitions move only after the session timeout
#: (Faust's default 60 s). Drills restart workers within seconds, so use 6 s (the broker's
#: group.min.session.timeout.ms) with a 1 s heartbeat.
FAST_FAILOVER_ENV = {"BROKER_SESSION_TIMEOUT": "6", "BROKER_HEARTBEAT_INTERVAL": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settings_env(s: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_")}
    for name in s.__class__.__dataclass_fields__:
        env[f"STREAM_{name.upper()}"] = str(getattr(s, name))
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class LocalWorker:
    """A ``stream worker`` subprocess for the command-line drills (tests use their fixture)."""

    settings: Settings
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> LocalWorker:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stream.tools.cli", "worker"],
                env=settings_env(self.settings) | FAST_FAILOVER_ENV,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DrillFailed(f"worker exited with {self.proc.returncode}: {self.log_path}")
            if "Worker]: Ready" in self.log_text()[offset:]:
                return self
            time.sleep(0.25)
        raise DrillFailed(
            f"worker not ready within {timeout}s: {self.log_path} (a tree whose numba kernels "
            "were never compiled compiles them at its first start: run scripts/setup.sh's "
            "warm-up line first)"
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric_value(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.settings.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        return sum(
            s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def stop(self, timeout: float = 40.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return -9

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (``VmRSS`` in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------- traffic


def valid_events(
    count: int, *, users: int, seed: int, tag: str, heavy_tail: bool = True
) -> list[PlayEvent]:
    """``count`` distinct plays (unique event ids), timestamped just before now. With
    ``heavy_tail`` a few listeners get a large share (as in real traffic); without it the
    plays are spread round-robin."""
    traffic = SyntheticTraffic(
        users=users,
        tracks=2000,
        artists=200,
        seed=seed,
        start_ms=int(time.time() * 1000) - 3_600_000,
    )
    return [
        replace(
            e,
            user_id=f"{tag}-{e.user_id}" if heavy_tail else f"{tag}-syn-u{i % users}",
            event_id=f"{tag}-{i}",
        )
        for i, e in enumerate(traffic.events(count))
    ]


class BackgroundProducer(threading.Thread):
    """Produces ``events`` at ``rate`` per second in a thread until they run out, ``halt()``
    is called, or ``max_seconds`` pass. ``sent`` is the prefix of ``events`` that was sent."""

    def __init__(
        self, settings: Settings, events: list[PlayEvent], rate: float, max_seconds: float
    ) -> None:
        super().__init__(name="fault-producer", daemon=True)
        self.settings = settings
        self.events = events
        self.rate = rate
        self.max_seconds = max_seconds
        self._halt = threading.Event()
        self.yielded = 0
        self.count = 0
        self.error: BaseException | None = None

    def halt(self) -> None:
        self._halt.set()

    def _source(self) -> Iterator[PlayEvent]:
        for ev in self.events:
            if self._halt.is_set():
                return
            self.yielded += 1
            yield ev

    def run(self) -> None:
        from stream.tools.producer import produce_events

        try:
            self.count = asyncio.run(
                produce_events(
                    self.settings,
                    self._source(),
                    rate=self.rate,
                    max_seconds=self.max_seconds,
                    progress=False,
                )
            )
        except BaseException as exc:  # noqa: BLE001 - reported by the drill
            self.error = exc

    @property
    def sent(self) -> list[PlayEvent]:
        return self.events[: self.count]


def send_records(settings: Settings, records: Iterable[tuple[bytes | None, bytes]]) -> int:
    """Produce raw (key, value) records to the plays topic, in order."""

    async def run() -> int:
        await ensure_topics(settings)
        producer = make_producer(settings, max_request_size=2 * 1024 * 1024)
        await producer.start()
        n = 0
        try:
            futures = []
            for key, value in records:
                futures.append(await producer.send(settings.plays_topic, value=value, key=key))
                n += 1
                if len(futures) >= 500:
                    await asyncio.gather(*futures)
                    futures.clear()
            await asyncio.gather(*futures)
        finally:
            await producer.stop()
        return n

    return asyncio.run(run())


# --------------------------------------------------------------------------- checking


def reader_for(settings: Settings) -> RecoReader:
    return RecoReader(
        settings.redis_url,
        password=settings.redis_password,
        prefix=settings.redis_prefix,
        similar_prefix=settings.similar_prefix,
        channel=settings.notify_channel,
    )


def expected_counts(events: Iterable[PlayEvent]) -> dict[str, int]:
    """Distinct event ids per listener."""
    ids: dict[str, set[str]] = {}
    for e in events:
        ids.setdefault(e.user_id, set()).add(e.event_id)
    return {u: len(s) for u, s in ids.items()}


def compare(reader: RecoReader, expected: dict[str, int]) -> dict[str, Any]:
    """Per-listener Redis documents vs the distinct events produced for them."""
    pipe = reader.client.pipeline(transaction=False)
    users = sorted(expected)
    for u in users:
        pipe.get(f"{reader.prefix}{u}")
    lost = double = missing = no_recs = inconsistent = 0
    examples: list[dict[str, Any]] = []
    from stream.processing.documents import RecoDocument

    for u, raw in zip(users, pipe.execute(), strict=True):
        if raw is None:
            missing += 1
            lost += expected[u]
            if len(examples) < 5:
                examples.append({"user": u, "expected": expected[u], "seq": None})
            continue
        doc = RecoDocument.from_json(raw)
        plays = int(doc.session.get("plays_total", -1))
        if plays != doc.seq:
            inconsistent += 1
        lost += max(0, expected[u] - doc.seq)
        double += max(0, doc.seq - expected[u])
        if doc.seq != expected[u] and len(examples) < 5:
            examples.append({"user": u, "expected": expected[u], "seq": doc.seq})
        if not doc.items:
            no_recs += 1
    return {
        "users": len(users),
        "events": sum(expected.values()),
        "lost": lost,
        "double_applied": double,
        "users_missing": missing,
        "users_without_recommendations": no_recs,
        "seq_plays_total_mismatch": inconsistent,
        "examples": examples,
    }


def wait_for_match(
    reader: RecoReader, expected: dict[str, int], timeout: float
) -> tuple[dict[str, Any], float]:
    """Poll until every listener's document matches (bounded); return the last comparison
    and how long it took."""
    started = time.monotonic()
    result = compare(reader, expected)
    while time.monotonic() - started < timeout:
        if _clean(result):
            break
        time.sleep(0.5)
        result = compare(reader, expected)
    return result, time.monotonic() - started


def _clean(result: dict[str, Any]) -> bool:
    return result["lost"] == 0 and result["double_applied"] == 0 and not result["users_missing"]


def stall_diagnostics(worker: Worker, wait_s: float = 3.0, max_chars: int = 30_000) -> dict:
    """What a worker that did not catch up was doing: its event counters and lag, the
    worker's own ``stream stalled`` warnings (asyncio task stacks, see stream.worker.watchdog) and
    every thread's stack (mode's worker dumps them on SIGUSR1) -- so a failed drill in CI
    says where the worker was stuck without a rerun."""
    if worker.proc is None or worker.proc.poll() is not None:
        return {"worker_alive": False}
    out: dict[str, Any] = {}
    try:
        out["events"] = {
            o: int(worker.metric_value("stream_events_total", outcome=o))
            for o in ("processed", "duplicate", "rejected")
        }
        out["lag"] = int(worker.metric_value("stream_consumer_lag_messages"))
        out["stalls"] = int(worker.metric_value("stream_stalls_total"))
    except Exception as exc:  # noqa: BLE001 - diagnostics must not hide the drill's result
        out["metrics_error"] = repr(exc)
    log = worker.log_text()
    warnings = [m.group(0) for m in re.finditer(r"stream stalled:.*?(?=\n\[\d{4}-|\Z)", log, re.S)]
    out["stall_warnings"] = [w[:max_chars] for w in warnings[-2:]]
    before = len(log)
    worker.proc.send_signal(signal.SIGUSR1)
    time.sleep(wait_s)
    dump = worker.log_text()[before:]
    # mode prints each frame's locals too: far too long for a test report
    dump = re.sub(r"-{20,}\nLOCAL VARIABLES\n-{20,}\n.*?\n\n", "", dump, flags=re.S)
    out["thread_stacks"] = dump[:max_chars]
    return out


def cleanup_keys(reader: RecoReader, settings: Settings) -> None:
    for pattern in (f"{settings.redis_prefix}*", f"{settings.similar_prefix}*"):
        keys = list(reader.client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 500):
            reader.client.delete(*keys[i : i + 500])


# --------------------------------------------------------------------------- drills


def crash_loop(
    settings: Settings,
    start_worker: StartWorker,
    *,
    kills: int = 10,
    users: int = 50,
    rate: float = 250.0,
    seed: int = 11,
    min_uptime_s: float = 1.0,
    max_uptime_s: float = 4.0,
    catch_up_timeout_s: float = 120.0,
    heavy_tail: bool = True,
) -> dict[str, Any]:
    """SIGKILL the worker ``kills`` times while a background producer streams plays, restart
    it each time, then check every listener's state counts each event exactly once."""
    rng = random.Random(seed)
    per_cycle_s = max_uptime_s + 12.0  # uptime + a generous restart
    budget_s = kills * per_cycle_s + 10.0
    events = valid_events(
        int(rate * budget_s), users=users, seed=seed, tag=f"c{seed}", heavy_tail=heavy_tail
    )
    worker = start_worker(settings)
    producer = BackgroundProducer(settings, events, rate, max_seconds=budget_s)
    producer.start()
    kill_log: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for i in range(kills):
            uptime = rng.uniform(min_uptime_s, max_uptime_s)
            time.sleep(uptime)
            assert worker.proc is not None
            processed = worker.metric_value("stream_events_total", outcome="processed")
            worker.kill()
            t0 = time.monotonic()
            worker = start_worker(settings)
            kill_log.append(
                {
                    "kill": i + 1,
                    "uptime_s": round(uptime, 2),
                    "processed_before_kill": int(processed),
                    "produced_so_far": producer.yielded,
                    "restart_s": round(time.monotonic() - t0, 2),
                }
            )
        time.sleep(2.0)  # let the last worker take some live traffic before the stream ends
    finally:
        producer.halt()
        producer.join(60)
    if producer.error is not None:
        raise DrillFailed(f"producer failed: {producer.error!r}")
    expected = expected_counts(producer.sent)
    reader = reader_for(settings)
    try:
        result, waited = wait_for_match(reader, expected, catch_up_timeout_s)
        if not _clean(result):
            result["stall_diagnostics"] = stall_diagnostics(worker)
        cleanup_keys(reader, settings)
    finally:
        reader.close()
    alive = worker.proc is not None and worker.proc.poll() is None
    return {
        "drill": "crash_loop",
        "kills": kills,
        "produced": len(producer.sent),
        "rate_ev_s": rate,
        "duration_s": round(time.monotonic() - started, 1),
        "catch_up_s": round(waited, 1),
        "worker_alive": alive,
        "duplicates_seen_by_last_worker": int(
            worker.metric_value("stream_events_total", outcome="duplicate") if alive else -1
        ),
        "kill_log": kill_log,
        **result,
    }


def redis_outage(
    settings: Settings,
    start_worker: StartWorker,
    workdir: Path,
    *,
    outage_s: float = 30.0,
    before_s: float = 4.0,
    users: int = 100,
    rate: float = 200.0,
    seed: int = 12,
    catch_up_timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Stop a private Redis for ``outage_s`` while plays stream in; the worker must keep
    consuming, count the errors, and bring Redis up to date when it returns."""
    server = stack.RedisServer(
        workdir / "redis",
        free_port(),
        # persistence, so the restarted server has the documents written before the outage
        ["--appendonly", "yes", "--appendfsync", "always"],
    ).start()
    settings = settings.replace(
        redis_url=f"redis://127.0.0.1:{server.port}/0",
        redis_password="",
        redis_retry_max_s=2.0,
    )
    # the stream ends during the outage: everything after it is pure catch-up
    count = int(rate * (before_s + outage_s / 2))
    events = valid_events(count, users=users, seed=seed, tag=f"r{seed}")
    reader = reader_for(settings)
    try:
        worker = start_worker(settings)
        producer = BackgroundProducer(settings, events, rate, max_seconds=before_s + outage_s)
        producer.start()
        time.sleep(before_s)
        errors_before = worker.metric_value("stream_redis_errors_total")
        server.stop()
        down_at = time.monotonic()
        processed_at_stop = worker.metric_value("stream_events_total", outcome="processed")
        time.sleep(outage_s)
        processed_during = (
            worker.metric_value("stream_events_total", outcome="processed") - processed_at_stop
        )
        errors_during = worker.metric_value("stream_redis_errors_total") - errors_before
        alive_during = worker.proc is not None and worker.proc.poll() is None
        server.start()
        up_at = time.monotonic()
        producer.join(60)
        if producer.error is not None:
            raise DrillFailed(f"producer failed: {producer.error!r}")
        expected = expected_counts(producer.sent)
        result, waited = wait_for_match(reader, expected, catch_up_timeout_s)
        if not _clean(result):
            result["stall_diagnostics"] = stall_diagnostics(worker)
        log = worker.log_text()
        report = {
            "drill": "redis_outage",
            "outage_s": round(up_at - down_at, 1),
            "produced": len(producer.sent),
            "processed_during_outage": int(processed_during),
            "redis_errors_during_outage": int(errors_during),
            "worker_alive_during_outage": alive_during,
            "worker_alive": worker.proc is not None and worker.proc.poll() is None,
            "logged_redis_failure": "redis flush of" in log,
            "logged_redis_back": "redis is back" in log,
            "catch_up_s": round(waited, 2),
            **result,
        }
        cleanup_keys(reader, settings)
        return report
    finally:
        reader.close()
        server.stop()


def broker_restart(
    settings: Settings,
    start_worker: StartWorker,
    workdir: Path,
    *,
    down_s: float = 5.0,
    count: int = 3000,
    users: int = 50,
    seed: int = 13,
    catch_up_timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Restart a private broker under a running worker (half the plays produced before, half
    after); the worker must reconnect and apply every play exactly once."""
    cfg = stack.private_config(
        workdir / "kafka-stack", kafka_port=free_port(), controller_port=free_port()
    )
    t0 = time.monotonic()
    stack.start_kafka(cfg)
    broker_start_s = time.monotonic() - t0
    settings = settings.replace(kafka_bootstrap=f"127.0.0.1:{cfg.kafka_port}")
    events = valid_events(count, users=users, seed=seed, tag=f"b{seed}")
    first, second = events[: count // 2], events[count // 2 :]
    reader = reader_for(settings)
    try:
        worker = start_worker(settings)
        asyncio.run(_produce(settings, first))
        # stop the broker while the worker is still busy with the first half
        stack.stop_kafka(cfg)
        time.sleep(down_s)
        alive_while_down = worker.proc is not None and worker.proc.poll() is None
        t1 = time.monotonic()
        stack.start_kafka(cfg)
        restart_s = time.monotonic() - t1
        asyncio.run(_produce(settings, second))
        expected = expected_counts(events)
        result, waited = wait_for_match(reader, expected, catch_up_timeout_s)
        if not _clean(result):
            result["stall_diagnostics"] = stall_diagnostics(worker)
        alive = worker.proc is not None and worker.proc.poll() is None
        report = {
            "drill": "broker_restart",
            "produced": len(events),
            "broker_down_s": down_s,
            "broker_start_s": round(broker_start_s, 1),
            "broker_restart_s": round(restart_s, 1),
            "worker_alive_while_broker_down": alive_while_down,
            "worker_alive": alive,
            "catch_up_s": round(waited, 1),
            **result,
        }
        cleanup_keys(reader, settings)
        if alive:
            worker.stop()
        return report
    finally:
        reader.close()
        stack.stop_kafka(cfg)


async def _produce(settings: Settings, events: list[PlayEvent]) -> int:
    from stream.tools.producer import produce_events

    return await produce_events(settings, events, progress=False)


# --------------------------------------------------------------------------- hostile input

UNICODE_IDS = (
    "u-\u202eevil",  # RTL override: a format character -> control_character
    "u-\u200bzw",  # zero-width space: a format character -> control_character
    "u-\U0001f3b5\U0001f525",  # emoji: valid
    "u-\u05e9\u05dc\u05d5\u05dd",  # Hebrew (RTL script, printable): valid
    "u-e\u0301",  # combining accent: valid
    "u-\ufeffbom",  # BOM: a format character -> control_character
)


@dataclass
class HostileCorpus:
    """Records to send (key, value) and what each one should become."""

    records: list[tuple[bytes | None, bytes]] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)


def hostile_corpus(count: int, *, seed: int, tag: str, now_ms: int) -> HostileCorpus:
    """A deterministic mix: ~40 % valid plays (some duplicated, some out of order, unicode
    ids), the rest random bytes, huge payloads, deep nesting, wrong types, unicode edge
    cases, NaN/inf, far-future and ancient timestamps, key mismatches."""
    rng = random.Random(seed)
    corpus = HostileCorpus()
    users = [f"{tag}-u{i}" for i in range(60)] + [f"{tag}{u}" for u in UNICODE_IDS]
    recent: list[tuple[bytes | None, bytes]] = []
    base = now_ms - 3_600_000

    def valid(i: int) -> dict[str, Any]:
        user = rng.choice(users)
        ts = base + i * 100
        if rng.random() < 0.15:
            ts -= rng.randint(1, 3_000_000)  # out of order, still in range
        return {
            "user_id": user,
            "track_id": f"t{rng.randrange(300)}",
            "ts": ts,
            "ms_played": rng.randint(0, 400_000),
            "event_id": f"{tag}-e{i}",
            "context": rng.choice(["playlist", "radio", "\u202e", "\U0001f3b6", None]),
        }

    def add(kind: str, key: bytes | None, value: bytes) -> None:
        corpus.records.append((key, value))
        corpus.kinds[kind] += 1

    for i in range(count):
        r = rng.random()
        if r < 0.36:
            ev = valid(i)
            rec = (ev["user_id"].encode(), json.dumps(ev).encode())
            add("valid", *rec)
            recent.append(rec)
            del recent[:-20]
        elif r < 0.40 and recent:
            add("duplicate", *rng.choice(recent))  # same bytes, same event id, soon after
        elif r < 0.47:
            add("random_bytes", None, rng.randbytes(rng.randint(0, 300)))
        elif r < 0.49:
            size = rng.choice([16 * 1024 + 1, 64 * 1024, 300 * 1024, 900 * 1024])
            ev = valid(i) | {"pad": "x" * size}
            add("huge", ev["user_id"].encode(), json.dumps(ev).encode())
        elif r < 0.55:
            depth = rng.choice([100, 500, 1000, 5000, 20000])
            nest = "[" * depth + "]" * depth if rng.random() < 0.5 else "[" * depth
            ev = valid(i)
            text = json.dumps(ev)[:-1] + f', "deep": {nest}}}'
            add("deep_nesting", ev["user_id"].encode(), text.encode())
        elif r < 0.65:
            ev = valid(i)
            name = rng.choice(
                [
                    "user_id",
                    "track_id",
                    "ts",
                    "ms_played",
                    "skipped",
                    "context",
                    "event_id",
                    "track_duration_ms",
                    "session_id",
                ]
            )
            ev[name] = rng.choice([[1], {"a": 1}, True, 3.5, "", " x ", -1, "12", 10**30])
            key = str(ev["user_id"]).encode() if isinstance(ev["user_id"], str) else None
            add("wrong_type", key, json.dumps(ev).encode())
        elif r < 0.72:
            ev = valid(i)
            choice = rng.randrange(5)
            if choice == 0:  # lone surrogate, escaped in JSON
                text = json.dumps(ev).replace(f'"{ev["track_id"]}"', '"t\\ud800x"', 1)
                add("unicode", ev["user_id"].encode(), text.encode())
            elif choice == 1:  # lone surrogate encoded as (invalid) UTF-8
                raw = json.dumps(ev).encode().replace(b'"ts"', b'"ts", "x": "\xed\xa0\x80"', 1)
                add("unicode", ev["user_id"].encode(), raw)
            elif choice == 2:  # overlong / truncated UTF-8
                add("unicode", None, json.dumps(ev).encode()[:-3] + b"\xc0\xaf\xe2\x82")
            else:  # unprintable or very long unicode ids
                ev["track_id"] = rng.choice(["\u200b", "t\u202e", "\U0001f3b5" * 300, "t\x00"])
                add("unicode", ev["user_id"].encode(), json.dumps(ev, ensure_ascii=False).encode())
        elif r < 0.77:
            ev = valid(i)
            literal = rng.choice(["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
            text = json.dumps(ev).replace(
                f'"ms_played": {ev["ms_played"]}', f'"ms_played": {literal}'
            )
            add("nan_inf", ev["user_id"].encode(), text.encode())
        elif r < 0.85:
            ev = valid(i)
            ev["ts"] = rng.choice(
                [
                    now_ms + 30 * 86_400_000,
                    now_ms + 48 * 3_600_000,
                    10**14,
                    0,
                    -5,
                    1_000_000_000,
                    "2999-01-01T00:00:00Z",
                    "1970-01-01T00:00:00Z",
                    "2026-01-01T00:00:00",
                    "not a date",
                ]
            )
            add("bad_timestamp", ev["user_id"].encode(), json.dumps(ev).encode())
        elif r < 0.90:
            ev = valid(i)
            add("key_mismatch", b"someone-else", json.dumps(ev).encode())
        else:
            junk = rng.choice(
                [
                    b"",
                    b"null",
                    b"[]",
                    b"42",
                    b'"str"',
                    b"{}",
                    b'{"user_id": 1}',
                    b"{" * 3,
                    b"\x00" * 50,
                    b'{"a":' * 1000,
                ]
            )
            add("not_an_event", None, junk)
    return corpus


def expected_outcomes(
    corpus: HostileCorpus, now_ms: int, settings: Settings
) -> tuple[list[tuple[bytes, str]], list[PlayEvent]]:
    """What the worker must do with each record: (value, reason) rejections, valid events."""
    rejected: list[tuple[bytes, str]] = []
    accepted: list[PlayEvent] = []
    for key, value in corpus.records:
        parsed = parse_event(
            value,
            now_ms=now_ms,
            max_bytes=settings.max_event_bytes,
            max_future_ms=settings.max_future_s * 1000,
        )
        if isinstance(parsed, Rejection):
            rejected.append((value, parsed.reason))
        elif key != parsed.user_id.encode():
            rejected.append((value, "key_mismatch"))
        else:
            accepted.append(parsed)
    return rejected, accepted


def hostile_input(
    settings: Settings,
    start_worker: StartWorker,
    *,
    count: int = 10_000,
    seed: int = 14,
    rss_limit_bytes: int = 1024 * 1024 * 1024,
    timeout_s: float = 180.0,
) -> dict[str, Any]:
    """Send a fuzzed corpus mixed with valid plays and check every record's fate."""
    now_ms = int(time.time() * 1000)
    tag = f"h{seed}x{uuid.uuid4().hex[:4]}"
    corpus = hostile_corpus(count, seed=seed, tag=tag, now_ms=now_ms)
    rejected, accepted = expected_outcomes(corpus, now_ms, settings)
    expected = expected_counts(accepted)
    worker = start_worker(settings)
    assert worker.proc is not None
    pid = worker.proc.pid
    rss_start = rss_bytes(pid)
    rss_peak = rss_start
    t0 = time.monotonic()
    send_records(settings, corpus.records)
    deadline = time.monotonic() + timeout_s
    total = len(corpus.records)
    while time.monotonic() < deadline:
        rss_peak = max(rss_peak, rss_bytes(pid))
        seen = sum(
            worker.metric_value("stream_events_total", outcome=o)
            for o in ("processed", "rejected", "duplicate")
        )
        if seen >= total or worker.proc.poll() is not None:
            break
        time.sleep(0.5)
    elapsed = time.monotonic() - t0
    alive = worker.proc.poll() is None
    reader = reader_for(settings)
    try:
        state, _ = wait_for_match(reader, expected, 30.0 if alive else 0.0)
        cleanup_keys(reader, settings)
    finally:
        reader.close()
    dlq = asyncio.run(
        read_topic(settings, settings.dlq_topic, max_messages=len(rejected), timeout_s=60)
    )
    got = Counter((r.value, dict(r.headers).get("dlq.reason", b"").decode()) for r in dlq)
    want = Counter(rejected)
    dlq_missing = sum((want - got).values())
    dlq_unexpected = sum((got - want).values())
    reasons = Counter(reason for _, reason in rejected)
    metrics = {
        o: int(worker.metric_value("stream_events_total", outcome=o)) if alive else -1
        for o in ("processed", "rejected", "duplicate")
    }
    report = {
        "drill": "hostile_input",
        "records": total,
        "kinds": dict(corpus.kinds),
        "expected_rejected": len(rejected),
        "expected_valid": len(accepted),
        "expected_distinct_valid": sum(expected.values()),
        "rejection_reasons": dict(reasons),
        "dlq_records": len(dlq),
        "dlq_missing": dlq_missing,
        "dlq_unexpected": dlq_unexpected,
        "worker_metrics": metrics,
        "worker_alive": alive,
        "rss_start_mb": round(rss_start / 2**20, 1),
        "rss_peak_mb": round(rss_peak / 2**20, 1),
        "rss_end_mb": round(rss_bytes(pid) / 2**20, 1) if alive else None,
        "rss_within_limit": rss_peak <= rss_limit_bytes,
        "processing_s": round(elapsed, 1),
        **state,
    }
    if alive:
        worker.stop()
    return report


# --------------------------------------------------------------------------- command line


def _drill_settings(tag: str) -> Settings:
    cfg = stack.StackConfig.from_env()
    extra = {"control_topic": f"{tag}-control"} if "control_topic" in Settings.__slots__ else {}
    return load_settings(
        env={},
        file=None,
        kafka_bootstrap=f"127.0.0.1:{cfg.kafka_port}",
        redis_url=f"redis://127.0.0.1:{cfg.redis_port}/0",
        redis_password=cfg.redis_password or None,
        app_id=f"{tag}-app",
        plays_topic=f"{tag}-plays",
        dlq_topic=f"{tag}-dlq",
        **extra,
        redis_prefix=f"{tag}:reco:",
        similar_prefix=f"{tag}:similar:",
        notify_channel=f"{tag}:reco-updates",
        metrics_port=free_port(),
        partitions=4,
        redis_flush_interval_ms=1.0,
        checkpoint_keys=f"{tag}:{uuid.uuid4().hex}",  # restarts restore what was written
        worker_keys=f"drill:{uuid.uuid4().hex}",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m load_tests.faults",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "drill",
        choices=[
            *("crash-loop", "redis-outage", "broker-restart", "hostile", "all", "attacks"),
            "junk-ids",
            *("redis-failover", "kafka-leader-kill", "rebalance-storm"),  # cluster_faults
            "recovery",  # load_tests.recovery
        ],
    )
    p.add_argument("--modes", nargs="+", default=["memory", "rocksdb", "standby"],
                   choices=["memory", "rocksdb", "standby"], help="recovery: modes to run")
    p.add_argument("--session-timeout-s", type=float, default=6.0,
                   help="recovery: the workers' kafka_session_timeout_s")
    p.add_argument("--dynamic-membership", action="store_true",
                   help="recovery: no kafka_group_instance_id (restarts wait out the session)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the worker logs (and recovery's data dirs) here; without it a "
                   "temporary directory, removed only when every drill passed")
    p.add_argument("--standby-catch-up-s", type=float, default=300.0,
                   help="recovery: longest wait for W2's standby copies to catch up")
    p.add_argument("--short", action="store_true", help="attacks: the CI variant")
    p.add_argument("--only", nargs="*", help="attacks: run only these (by name)")
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--rate", type=float, default=250.0)
    p.add_argument("--outage-s", type=float, default=30.0)
    p.add_argument("--down-s", type=float, default=10.0)
    p.add_argument("--count", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument(
        "--uniform",
        action="store_true",
        help="crash-loop: spread plays evenly (no heavy listeners)",
    )
    p.add_argument("--report", type=Path, default=Path("faults-report.json"))
    p.add_argument("--seconds", type=float, default=600.0, help="junk-ids: bound on sending")
    p.add_argument("--junk-rate", type=float, default=1000.0, help="junk-ids: plays/s")
    p.add_argument("--max-tracks", type=int, default=None, help="junk-ids: worker's cap")
    p.add_argument("--max-users", type=int, default=None, help="junk-ids: worker's cap")
    args = p.parse_args(argv)
    if args.drill == "junk-ids":
        return _junk_ids_main(args)
    if args.drill == "attacks":
        return _attacks_main(args)
    if args.drill == "recovery":
        from load_tests import recovery

        return recovery.main(args, _drill_settings(f"r{uuid.uuid4().hex[:8]}"))
    drills = ["crash-loop", "redis-outage", "broker-restart", "hostile"]
    chosen = drills if args.drill == "all" else [args.drill]
    reports: list[dict[str, Any]] = []
    # the worker logs are the only record of what a failed drill's workers did: the workdir is
    # removed only when every drill passed (or kept anyway with --workdir)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"[faults] workdir (worker logs): {workdir}", file=sys.stderr, flush=True)
    workers: list[LocalWorker] = []

    def start(s: Settings) -> LocalWorker:
        w = LocalWorker(s, workdir / f"worker-{len(workers)}.log")
        workers.append(w)
        return w.start()

    try:
        for name in chosen:
            s = _drill_settings(f"f{uuid.uuid4().hex[:8]}")
            print(f"[faults] {name} ...", file=sys.stderr, flush=True)
            if name == "crash-loop":
                r = crash_loop(
                    s, start, kills=args.kills, users=args.users, rate=args.rate, seed=args.seed
                )
            elif name == "redis-outage":
                r = redis_outage(s, start, workdir, outage_s=args.outage_s, seed=args.seed)
            elif name == "redis-failover":  # Redis Cluster: load_tests.cluster_faults
                from load_tests import cluster_faults

                r = cluster_faults.run(s, start, workdir, rate=args.rate, seed=args.seed,
                                       plot=args.report.with_suffix(".png"))
            elif name == "rebalance-storm":  # 3 workers: load_tests.cluster_faults
                from load_tests import cluster_faults

                r = cluster_faults.rebalance_storm(
                    s, start, rate=args.rate, seed=args.seed,
                    plot=args.report.with_suffix(".png"))
            elif name == "kafka-leader-kill":  # 3 brokers: load_tests.cluster_faults
                from load_tests import cluster_faults

                r = cluster_faults.run_leader_kill(
                    s, start, workdir, rate=args.rate, seed=args.seed,
                    plot=args.report.with_suffix(".png"))
            elif name == "broker-restart":
                r = broker_restart(s, start, workdir, down_s=args.down_s, seed=args.seed)
            else:
                r = hostile_input(s, start, count=args.count, seed=args.seed)
            for w in workers:
                w.stop()
            reports.append(r)
            print(
                json.dumps({k: v for k, v in r.items() if k != "kill_log"}, indent=1),
                file=sys.stderr,
                flush=True,
            )
    finally:
        for w in workers:
            w.kill()
    ok = all(
        r.get("lost") == 0
        and r.get("double_applied") == 0
        and r.get("worker_alive")
        and r.get("dlq_missing", 0) == 0
        and r.get("dlq_unexpected", 0) == 0
        for r in reports
    )
    args.report.write_text(json.dumps({"ok": ok, "drills": reports}, indent=2, default=str))
    print(f"[faults] report: {args.report} ({'OK' if ok else 'FAILED'})", file=sys.stderr)
    if ok and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"[faults] worker logs kept in {workdir}", file=sys.stderr)
    return 0 if ok else 1


def _junk_ids_main(args: argparse.Namespace) -> int:
    """``junk-ids`` (load_tests/junk_ids.py): its own report and a PNG plot beside it."""
    from load_tests.junk_ids import drill_settings, junk_ids, new_tag

    if args.count < 1 or args.seconds <= 0:
        raise SystemExit("--count must be >= 1 and --seconds > 0")
    s = drill_settings(_drill_settings(new_tag()), max_tracks=args.max_tracks,
                       max_users=args.max_users)
    with tempfile.TemporaryDirectory(prefix="junk-") as tmp:
        w = LocalWorker(s, Path(tmp) / "worker.log")
        try:
            r = junk_ids(s, lambda _s: w.start(), count=args.count, seconds=args.seconds,
                         rate=args.junk_rate, seed=args.seed,
                         plot=args.report.with_suffix(".png"))
        finally:
            text = w.log_text() if w.log_path.exists() else ""
            tail = text[-3000:]
            stalls = [line for line in text.splitlines() if "event loop held" in line]
            if text:  # the whole worker log beside the report (what the stalls were)
                args.report.with_suffix(".log").write_text(text)
            w.kill()
    r["worker_log_tail"] = tail
    r["loop_stalls_sampled"] = stalls[-200:]
    # the target (issue 15, item 5): no turn of the loop's own work over 50 ms. The wall
    # lag also counts the time the machine did not run the worker (on a shared box the idle
    # probe beside it shows how much): reported next to it, judged on its own
    busy, lag = r.get("loop_busy_max_ms"), r.get("loop_lag_max_ms")
    r["own_work_within_50ms"] = busy is not None and busy <= 50
    r["wall_lag_within_50ms"] = lag is not None and lag <= 50
    ok = bool(r["worker_alive"] and r["real_lists_fresh"] and r["own_work_within_50ms"])
    print(f"[junk-ids] loop's own work per turn: longest {busy} ms (target <= 50); wall lag "
          f"longest {lag} ms; idle probe beside it {r.get('idle_process_loop_lag')}",
          file=sys.stderr)
    args.report.write_text(json.dumps({"ok": ok, "drills": [r]}, indent=2, default=str))
    summary = {k: v for k, v in r.items()
               if k not in ("series", "worker_log_tail", "loop_stalls_sampled")}
    print(json.dumps(summary, indent=1), file=sys.stderr)
    print(f"[faults] report: {args.report} ({'OK' if ok else 'FAILED'})", file=sys.stderr)
    return 0 if ok else 1


def _attacks_main(args: argparse.Namespace) -> int:
    from load_tests.attacks import run_attacks

    with tempfile.TemporaryDirectory(prefix="attacks-") as tmp:
        workers: list[LocalWorker] = []

        def start(s: Settings) -> LocalWorker:
            w = LocalWorker(s, Path(tmp) / f"worker-{len(workers)}.log")
            workers.append(w)
            return w.start()

        try:
            report = run_attacks(
                _drill_settings(f"a{uuid.uuid4().hex[:8]}"), start, short=args.short,
                only=args.only,
            )
        finally:
            for w in workers:
                w.kill()
    args.report.write_text(json.dumps(report, indent=2, default=str))
    for r in report["attacks"]:
        print(f"  {r['attack']:<28} {r['area']:<11} "
              f"{'contained' if r['contained'] else 'NOT CONTAINED'}", file=sys.stderr)
    print(f"[attacks] {report['contained']}/{len(report['attacks'])} contained; report: "
          f"{args.report}", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
