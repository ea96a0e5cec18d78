"""Shared plumbing for the load tests: unique run names, the worker subprocess, scraping its
/metrics, RSS from /proc, consumer-group lag from Kafka, percentiles, JSON reports, tables."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from stream.adapters.kafka import client_kwargs
from stream.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "load_tests" / "results"


def run_id(kind: str) -> str:
    return f"lt-{kind}-{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:6]}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_settings() -> Settings:
    return load_settings()


# --------------------------------------------------------------------------- subprocesses


@dataclass
class Proc:
    """A child process we started (and only that one is ever signalled)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    metrics_url: str | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def cli_module(tree: Path | None = None) -> str:
    """The CLI module of ``tree`` (or this checkout): ``stream.tools.cli`` since the layout move
    (issue 16), ``stream.cli`` in older baseline commits."""
    root = tree or ROOT
    return "stream.tools.cli" if (root / "stream" / "tools" / "cli.py").exists() else "stream.cli"


def spawn(
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    log_dir: Path,
    tree: Path | None = None,
) -> Proc:
    """Start ``argv`` logging to ``log_dir/name.log``. With ``tree`` (another checkout, e.g. a
    baseline commit's worktree) it runs that tree's code: cwd and PYTHONPATH point there."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    if tree is not None:
        full_env["PYTHONPATH"] = str(tree)
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            list(argv),
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tree or ROOT,
            start_new_session=True,
        )
    return Proc(name, popen, log_path)


#: one checkpoint key per load-test process: its workers sign and restore checkpoints, and
#: a worker restarted by a drill verifies what the previous one wrote
_CHECKPOINT_KEYS = f"lt{uuid.uuid4().hex[:6]}:{uuid.uuid4().hex}"


def worker_env(rid: str, topic: str, metrics_port: int) -> dict[str, str]:
    """Env for a `stream worker` isolated from every other run (app id, topics, Redis keys)."""
    return {
        "STREAM_CHECKPOINT_KEYS": _CHECKPOINT_KEYS,
        "STREAM_APP_ID": rid,
        "STREAM_PLAYS_TOPIC": topic,
        "STREAM_DLQ_TOPIC": f"{topic}-dlq",
        "STREAM_REDIS_PREFIX": f"{rid}:reco:",
        "STREAM_NOTIFY_CHANNEL": f"{rid}-updates",
        "STREAM_METRICS_HOST": "127.0.0.1",
        "STREAM_METRICS_PORT": str(metrics_port),
        "STREAM_LOG_LEVEL": "warning",
    }


def start_worker(
    rid: str,
    topic: str,
    log_dir: Path,
    extra_env: Mapping[str, str] | None = None,
    name: str = "worker",
    tree: Path | None = None,
) -> Proc:
    port = free_port()
    env = {**worker_env(rid, topic, port), **(extra_env or {})}
    proc = spawn(name, [sys.executable, "-m", cli_module(tree), "worker"], env, log_dir, tree)
    proc.metrics_url = f"http://127.0.0.1:{port}/metrics"
    return proc


def wait_assigned(proc: Proc, topic: str, timeout_s: float = 90.0) -> float:
    """Wait until the worker reports partitions of ``topic`` assigned; returns seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log_tail()}")
        m = scrape(proc.metrics_url)
        if m and metric_sum(m, "stream_assigned_partitions", topic=topic) > 0:
            return time.monotonic() - t0
        time.sleep(0.25)
    raise TimeoutError(
        f"{proc.name}: no partitions assigned after {timeout_s:.0f} s\n{proc.log_tail()}"
    )


def wait_group_stable(procs: Sequence[Proc], topic: str, partitions: int,
                      stable_s: float = 5.0, timeout_s: float = 120.0) -> float:
    """Wait until the workers of one group hold all ``partitions`` of ``topic`` between
    them, each at least one, with no change for ``stable_s`` (a rebalance of workers that
    joined one by one is over); returns seconds waited. Raises TimeoutError."""
    t0 = time.monotonic()
    last: list[float] | None = None
    since = t0
    while time.monotonic() - t0 < timeout_s:
        counts = []
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited:\n{p.log_tail()}")
            m = scrape(p.metrics_url)
            counts.append(metric_sum(m, "stream_assigned_partitions", topic=topic) if m
                          else -1.0)
        now = time.monotonic()
        if counts != last:
            last, since = counts, now
        elif (sum(counts) == partitions and min(counts) > 0
              and now - since >= stable_s):
            return now - t0
        time.sleep(0.5)
    raise TimeoutError(f"group on {topic} not stable after {timeout_s:.0f} s: {last}")


# --------------------------------------------------------------------------- metrics / RSS

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Samples = list[tuple[str, dict[str, str], float]]


def scrape(url: str | None, timeout: float = 2.0) -> Samples | None:
    """Parse a Prometheus text exposition into (name, labels, value); None if unreachable."""
    if url is None:
        return None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    out: Samples = []
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _LINE.match(line)
        if m:
            labels = dict(_LABEL.findall(m.group(3) or ""))
            try:
                out.append((m.group(1), labels, float(m.group(4))))
            except ValueError:
                continue
    return out


def metric_sum(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())
    )


def histogram_summary(samples: Samples | None, name: str) -> dict[str, float | None]:
    """Count, mean and p50/p99 (bucket upper bounds) of histogram ``name`` (``..._seconds``)
    summed over every worker's scrape in ``samples``."""
    if not samples:
        return {"count": 0, "mean": None, "p50": None, "p99": None}
    count = metric_sum(samples, f"{name}_count")
    buckets: dict[float, float] = {}
    for n, lab, v in samples:
        if n == f"{name}_bucket":
            le = float(lab["le"])
            buckets[le] = buckets.get(le, 0.0) + v
    def quantile(q: float) -> float | None:
        return next((le for le, c in sorted(buckets.items()) if count and c >= q * count), None)
    return {
        "count": count,
        "mean": metric_sum(samples, f"{name}_sum") / count if count else None,
        "p50": quantile(0.5),
        "p99": quantile(0.99),
    }


def live_quality(samples: Samples | None) -> dict[str, dict[str, float]]:
    """The workers' own prequential quality (``stream_quality_*`` gauges, the samples of
    one or more workers' scrapes concatenated in worker order), combined over the workers:
    per variant, HR@10 and NDCG@10 weighted by the events in each worker's window, and
    those events summed."""
    per: dict[tuple[str, str], list[float]] = {}
    for name, labels, value in samples or ():
        if name in ("stream_quality_hr_at_10", "stream_quality_ndcg_at_10",
                    "stream_quality_window_events"):
            per.setdefault((name, labels.get("variant", "")), []).append(value)
    out: dict[str, dict[str, float]] = {}
    for (name, variant), events in per.items():
        if name != "stream_quality_window_events":
            continue
        total = sum(events)
        row: dict[str, float] = {"events": total}
        for metric, key in (("stream_quality_hr_at_10", "hr@10"),
                            ("stream_quality_ndcg_at_10", "ndcg@10")):
            values = per.get((metric, variant), [])
            if len(values) == len(events) and total > 0:
                row[key] = sum(v * n for v, n in zip(values, events, strict=True)) / total
        out[variant] = row
    return out


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class GroupLag:
    """Kafka end offsets minus a consumer group's committed offsets (aiokafka admin)."""

    def __init__(self, settings: Settings, group: str, topic: str) -> None:
        self.settings = settings
        self.group = group
        self.topic = topic
        self.admin: AIOKafkaAdminClient | None = None
        self.consumer: Any = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        self.admin = AIOKafkaAdminClient(**client_kwargs(self.settings))
        await self.admin.start()
        self.consumer = AIOKafkaConsumer(**client_kwargs(self.settings), enable_auto_commit=False)
        await self.consumer.start()

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        if self.admin is not None:
            await self.admin.close()

    async def lag(self) -> int | None:
        assert self.admin is not None and self.consumer is not None
        try:
            parts = self.consumer.partitions_for_topic(self.topic)
            if not parts:
                await self.consumer._client.force_metadata_update()
                parts = self.consumer.partitions_for_topic(self.topic) or set()
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            if not tps:
                return None
            ends = await self.consumer.end_offsets(tps)
            committed = await self.admin.list_consumer_group_offsets(self.group, partitions=tps)
            total = 0
            for tp in tps:
                meta = committed.get(tp)
                done = meta.offset if meta is not None and meta.offset >= 0 else 0
                total += max(0, ends[tp] - done)
            return total
        except Exception:  # noqa: BLE001 - a missed sample is recorded as None, not fatal
            return None


# --------------------------------------------------------------------------- statistics


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
    if not values:
        return {f"p{q:g}": math.nan for q in qs} | {"max": math.nan, "mean": math.nan, "n": 0}
    xs = sorted(values)
    out: dict[str, float] = {}
    for q in qs:
        k = (len(xs) - 1) * q / 100.0
        lo, hi = math.floor(k), math.ceil(k)
        out[f"p{q:g}"] = xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
    out["max"] = xs[-1]
    out["mean"] = sum(xs) / len(xs)
    out["n"] = len(xs)
    return out


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (units of y per unit of x); nan with < 3 points."""
    pts = [(x, y) for x, y in points if y is not None and not math.isnan(y)]
    if len(pts) < 3:
        return math.nan
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    var = sum((p[0] - mx) ** 2 for p in pts)
    if var == 0:
        return math.nan
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / var


def environment() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except OSError:
        commit = ""
    load = os.getloadavg()
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host_cpus": os.cpu_count(),
        "loadavg_1m": round(load[0], 2),
        "python": platform.python_version(),
        "git_commit": commit,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


@dataclass
class Report:
    """A JSON report with its plots, written under load_tests/results/<run id>/."""

    name: str
    rid: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return RESULTS / self.rid

    def write(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{self.name}.json"
        path.write_text(
            json.dumps({"environment": environment(), **self.data}, indent=2, default=_jsonable)
            + "\n"
        )
        return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[_fmt(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False)))
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        return f"{x:,.2f}" if abs(x) < 100 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@contextlib.contextmanager
def baseline_tree(commit: str | None) -> Iterator[Path | None]:
    """A detached git worktree of ``commit`` (removed afterwards), or None."""
    if not commit:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="p1-base-") as tmp:
        base = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), commit],
                       cwd=ROOT, check=True, capture_output=True)
        try:
            # compile its numba kernels into its own cache first, as scripts/setup.sh does
            # for a checkout: a cold cache made the baseline worker compile after joining
            # its group and start every freshness run with a backlog
            warm_module = ("stream.core.recommender" if (base / "stream" / "core").is_dir()
                           else "stream.recommender")
            warm = subprocess.run(
                [sys.executable, "-c", f"from {warm_module} import warm_up; warm_up()"],
                cwd=base, env={**os.environ, "PYTHONPATH": str(base)}, capture_output=True,
                text=True, timeout=600,
            )
            if warm.returncode != 0:
                print(f"baseline {commit}: kernel warm-up failed:\n{warm.stderr[-2000:]}",
                      file=sys.stderr)
            yield base
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT,
                           check=False, capture_output=True)
