"""Every shipped dashboard query and rule expression returns data from a real Prometheus.

The stack's Prometheus (``stream stack up``) scrapes ``127.0.0.1:9464``
(:data:`stream.tools.stack.TEST_METRICS_PORT`) besides the default worker port. This module starts
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
import datetime
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream.config import Settings
from stream.tools import stack
from stream.tools.datasets import load_events
from stream.tools.producer import retime
from tests.promqueries import RULES, dashboard_queries, raw_metrics, rule_queries

from .conftest import Budget, WorkerProcess, produce, unique_settings, wait_until

pytestmark = pytest.mark.integration

JOB = "stream-worker"
TARGET = f"127.0.0.1:{stack.TEST_METRICS_PORT}"

# --------------------------------------------------------------------------- queries

MALFORMED = (b"not json", b'{"user_id": "u1"}', b"[1, 2, 3]")



def params() -> list[Any]:
    return [pytest.param(expr, id=qid) for qid, expr in dashboard_queries() + rule_queries()]


# --------------------------------------------------------------------------- Prometheus


def _rfc3339(stamp: str) -> float:
    """Prometheus's ``2026-12-04T13:48:56.961024462Z`` as a POSIX time."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    seconds = datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.UTC).timestamp()
    return seconds + (float(f"0.{frac}") if frac else 0.0)


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


    def rules_evaluated_since(self, since: float, times: int) -> bool:
        """Whether every rule group has been evaluated ``times`` times since the wall-clock
        time ``since`` (an evaluation at ``since + (times - 1) * interval`` or later is at
        least the ``times``-th: a group is evaluated once per interval)."""
        groups = self.get("/api/v1/rules")["data"]["groups"]
        return bool(groups) and all(
            _rfc3339(g["lastEvaluation"]) >= since + (times - 1) * float(g["interval"])
            for g in groups
        )

    def target(self) -> dict[str, Any] | None:
        body = self.get("/api/v1/targets", state="active")
        for t in body["data"]["activeTargets"]:
            if t["labels"].get("instance") == TARGET and t["labels"].get("job") == JOB:
                return dict(t)
        return None


#: The module fixtures below run inside the first test's timeout (pyproject's 300 s per
#: test, setup included): all their waits together stay within this, leaving that test
#: its own 15 s query wait and then some.
SETUP_BUDGET_S = 240.0


@pytest.fixture(scope="module")
def setup_budget() -> Budget:
    return Budget(SETUP_BUDGET_S, "observability module setup")


@pytest.fixture(scope="module")
def prometheus(services: stack.StackConfig, setup_budget: Budget) -> Prometheus:
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

    wait_until(
        lambda: shipped <= loaded(),
        setup_budget.step(30),
        what=f"Prometheus to load the rules in {RULES}",
    )
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
    setup_budget: Budget,
) -> Iterator[WorkerProcess]:
    """A worker on the scraped test port, fed with real plays, fully scraped."""
    s = observed_settings
    log = tmp_path_factory.mktemp("observability") / "worker.log"
    worker = WorkerProcess(dataclasses.replace(s), log)
    worker.start(timeout=setup_budget.step(90))
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

        wait_until(lambda: worker.metric_value("stream_events_total") >= sent,
                   setup_budget.step(120), what=f"worker to consume all {sent} records")
        wait_until(scraped_all, setup_budget.step(60),
                   what=f"Prometheus to scrape {sent} consumed events")
        final_state_at = time.time()
        # enough scrapes for the rate() windows, and every rule group evaluated at least
        # twice on the final state (chained recording rules need the second evaluation)
        wait_until(
            lambda: (prometheus.value(f'count_over_time(up{{instance="{TARGET}"}}[1m])') or 0)
            >= 5,
            setup_budget.step(60),
            what=f"5 scrapes of {TARGET} within a minute",
        )
        wait_until(
            lambda: prometheus.rules_evaluated_since(final_state_at, times=2),
            setup_budget.step(60),
            what="every rule group evaluated twice on the final state",
        )
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
    # (prometheus.query asserts that the query parses)
    wait_until(lambda: prometheus.query(expr), 15, interval=1, what=f"data for {expr!r}")
