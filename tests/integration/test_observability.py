"""Every shipped dashboard query and rule expression returns data from a real Prometheus.

The stack's Prometheus (``stream stack up``) scrapes ``127.0.0.1:9464``
(:data:`stream.stack.TEST_METRICS_PORT`) besides the default worker port. This module starts
a real ``stream worker`` with its metrics on that port, feeds it real plays (Last.fm with its
original timestamps, so listening sessions split; the Spotify sample for play contexts and
skips; Last.fm re-timed to now for live freshness; a few malformed records for the DLQ),
waits until Prometheus has scraped the final state and evaluated the rules, then for

* every panel target and annotation of ``configs/grafana/dashboards/*.json``,
* every recording rule (its expression and the recorded series),
* every operand of every alert expression (``a > 1000 and deriv(a[10m]) > 0`` checks ``a``
  and ``deriv(a[10m])``: a healthy system does not fire, but the signals must exist),

asserts that Prometheus parses the query and returns at least one series, and that every
``stream_*`` metric the query names is exported by this worker right now (so stale series
from an earlier run cannot hide a renamed metric).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream import stack
from stream.config import Settings
from stream.datasets import load_events
from stream.producer import retime

from .conftest import WorkerProcess, produce, unique_settings, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "configs" / "grafana" / "dashboards"
RULES = ROOT / "configs" / "prometheus" / "rules"
JOB = "stream-worker"
TARGET = f"127.0.0.1:{stack.TEST_METRICS_PORT}"

# --------------------------------------------------------------------------- queries

MALFORMED = (b"not json", b'{"user_id": "u1"}', b"[1, 2, 3]")



def substitute_variables(expr: str) -> str:
    """Grafana template variables -> what "All" selects."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$instance", ".*")
        .replace("$stage", ".*")
    )


_SPLIT_KEYWORDS = re.compile(r"(and|or|unless)\b")
_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_MODIFIER = re.compile(
    r"\s*(bool\s+)?((on|ignoring)\s*\([^)]*\)\s*)?((group_left|group_right)\s*(\([^)]*\))?)?"
)
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def operands(expr: str) -> list[str]:
    """Top-level operands of set operators (and/or/unless) and comparisons, numbers dropped.

    >>> operands('a > 1000 and deriv(a[10m]) > 0')
    ['a', 'deriv(a[10m])']
    >>> operands('x{l="a>b"} < 0.7 * avg_over_time(y[1h])')
    ['x{l="a>b"}', '0.7 * avg_over_time(y[1h])']
    """
    parts: list[str] = []
    depth = 0
    quote = ""
    start = 0
    i = 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = ""
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            op = next((o for o in _COMPARISONS if expr.startswith(o, i)), None)
            kw = None
            if op is None and (i == 0 or not (expr[i - 1].isalnum() or expr[i - 1] in "_:")):
                m = _SPLIT_KEYWORDS.match(expr, i)
                kw = m.group(0) if m else None
            if op or kw:
                parts.append(expr[start:i])
                i += len(op or kw or "")
                i = _MODIFIER.match(expr, i).end()  # type: ignore[union-attr]
                start = i
                continue
        i += 1
    parts.append(expr[start:])
    cleaned = [" ".join(p.split()) for p in parts]
    return [p for p in cleaned if p and not _NUMBER.match(p)]


def dashboard_queries() -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append(
                        (f"panel:{panel['title']}:{target['refId']}",
                         substitute_variables(target["expr"]))
                    )
        for ann in dash.get("annotations", {}).get("list", []):
            if ann.get("expr"):
                for i, part in enumerate(operands(substitute_variables(ann["expr"]))):
                    out.append((f"annotation:{ann['name']}:{i}", part))
    return out


def rule_queries() -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for path in sorted(RULES.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    out.append((f"record-expr:{rule['record']}", rule["expr"]))
                    out.append((f"record:{rule['record']}", rule["record"]))
                else:
                    for i, part in enumerate(operands(rule["expr"])):
                        out.append((f"alert:{rule['alert']}:{i}", part))
    return out


METRIC_NAME = re.compile(r"\b(stream_[a-z0-9_]+)\b")


def stream_metrics(expr: str) -> set[str]:
    """``stream_*`` metric names in ``expr``, recording-rule names (with ``:``) excluded."""
    names = set()
    for m in METRIC_NAME.finditer(expr):
        before = expr[m.start() - 1] if m.start() else ""
        after = expr[m.end()] if m.end() < len(expr) else ""
        if before != ":" and after != ":":
            names.add(m.group(1))
    return names


def raw_metrics(expr: str) -> set[str]:
    """``stream_*`` metrics ``expr`` reads, through (chained) recording rules."""
    recorded = {
        r["record"]: r["expr"]
        for path in RULES.glob("*.yml")
        for g in yaml.safe_load(path.read_text())["groups"]
        for r in g["rules"]
        if "record" in r
    }
    seen = expr
    for _ in range(4):
        for name, body in recorded.items():
            if name in seen and body not in seen:
                seen += " " + body
    return stream_metrics(seen)


def params() -> list[Any]:
    return [pytest.param(expr, id=qid) for qid, expr in dashboard_queries() + rule_queries()]


# --------------------------------------------------------------------------- Prometheus


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:  # 400 = the query does not parse
            body = json.load(exc)
        return body

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = self.get("/api/v1/query", query=expr)
        assert body.get("status") == "success", f"Prometheus rejected {expr!r}: {body}"
        result = body["data"]["result"]
        return result if isinstance(result, list) else [result]

    def value(self, expr: str) -> float | None:
        res = self.query(expr)
        return float(res[0]["value"][1]) if res else None


    def target(self) -> dict[str, Any] | None:
        body = self.get("/api/v1/targets", state="active")
        for t in body["data"]["activeTargets"]:
            if t["labels"].get("instance") == TARGET and t["labels"].get("job") == JOB:
                return dict(t)
        return None


@pytest.fixture(scope="module")
def prometheus(services: stack.StackConfig) -> Prometheus:
    prom = Prometheus(services.prometheus_port)
    try:
        ready = stack.prometheus_ready(services.prometheus_port)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"Prometheus on 127.0.0.1:{services.prometheus_port} unreachable: {exc!r}")
    assert ready, "Prometheus not ready"
    # pick up rule edits made since the stack started (SIGHUP: the HTTP lifecycle API is off)
    stack.reload_prometheus(services)
    if prom.target() is None:
        pytest.fail(
            f"Prometheus does not scrape {TARGET}: restart it so the stack renders the default "
            "targets (`stream stack down prometheus && stream stack up prometheus`), or include "
            f"{TARGET} in STREAM_STACK_METRICS_TARGETS"
        )
    shipped = {
        r.get("record") or r.get("alert")
        for path in RULES.glob("*.yml")
        for g in yaml.safe_load(path.read_text())["groups"]
        for r in g["rules"]
    }

    def loaded() -> set[str]:
        groups = prom.get("/api/v1/rules")["data"]["groups"]
        return {r["name"] for g in groups for r in g["rules"]}

    wait_until(lambda: shipped <= loaded(), 30, what=f"Prometheus to load the rules in {RULES}")
    return prom


# --------------------------------------------------------------------------- the fed worker


@pytest.fixture(scope="module")
def observed_settings(services: stack.StackConfig) -> Settings:
    return unique_settings(services, "obs", metrics_port=stack.TEST_METRICS_PORT)


@pytest.fixture(scope="module")
def observed(
    prometheus: Prometheus,
    observed_settings: Settings,
    datasets_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerProcess]:
    """A worker on the scraped test port, fed with real plays, fully scraped."""
    s = observed_settings
    log = tmp_path_factory.mktemp("observability") / "worker.log"
    worker = WorkerProcess(dataclasses.replace(s), log)
    worker.start()
    try:
        lastfm = load_events(datasets_dir / "lastfm-1k-sample", "lastfm", limit=3000)
        spotify = load_events(datasets_dir / "spotify-mssd-sample", "spotify")
        sent = produce(s, lastfm[:1500])  # original times: sessions split by real gaps
        sent += produce(s, spotify)  # contexts, skips, explicit session ids
        sent += produce(s, MALFORMED)
        # live traffic at a steady rate for a while, so rates and freshness are current
        sent += produce(s, retime(lastfm[1500:], None), rate=100.0, max_seconds=20)
        consumed = f'sum(stream_events_total{{instance="{TARGET}", topic="{s.plays_topic}"}})'

        def scraped_all() -> bool:
            v = prometheus.value(consumed)
            return v is not None and v >= sent

        wait_until(lambda: worker.metric_value("stream_events_total") >= sent, 120,
                   what=f"worker to consume all {sent} records")
        wait_until(scraped_all, 60, what=f"Prometheus to scrape {sent} consumed events")
        # a few more scrapes and two rule evaluations on the final state
        time.sleep(12)
        yield worker
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def exported(observed: WorkerProcess) -> set[str]:
    """Sample names the worker exports right now (``_total``, ``_bucket``... included)."""
    from prometheus_client.parser import text_string_to_metric_families

    names: set[str] = set()
    for family in text_string_to_metric_families(observed.metrics()):
        names.update(sample.name for sample in family.samples)
    return names


# --------------------------------------------------------------------------- tests


def test_target_is_up_and_scraped(prometheus: Prometheus, observed: WorkerProcess) -> None:
    target = prometheus.target()
    assert target is not None and target["health"] == "up", target
    scrapes = prometheus.value(f'count_over_time(up{{instance="{TARGET}"}}[1m])')
    assert scrapes is not None and scrapes >= 5


def test_worker_processed_the_plays(observed: WorkerProcess) -> None:
    """The data behind the queries comes from a healthy pipeline, not only from rejections."""
    processed = observed.metric_value("stream_events_total", outcome="processed")
    rejected = observed.metric_value("stream_events_total", outcome="rejected")
    assert processed >= 3000 and rejected == len(MALFORMED), (processed, rejected)


@pytest.mark.parametrize("expr", params())
def test_query_returns_data(
    expr: str, prometheus: Prometheus, observed: WorkerProcess, exported: set[str]
) -> None:
    missing = raw_metrics(expr) - exported
    assert not missing, f"not exported by the worker: {sorted(missing)} (renamed?) in {expr!r}"
    deadline = time.monotonic() + 15
    while True:
        result = prometheus.query(expr)  # asserts the query parses
        if result or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert result, f"no data for {expr!r}"


def test_queries_are_found() -> None:
    """The collectors above really see the shipped configs (guards against a silent zero)."""
    ids = [qid for qid, _ in dashboard_queries() + rule_queries()]
    assert sum(i.startswith("panel:") for i in ids) >= 30
    assert sum(i.startswith("alert:") for i in ids) >= 5
    assert any(i.startswith("annotation:Drift") for i in ids)
