"""The collectors of the shipped dashboard and rule queries (tests/promqueries.py) really
see the shipped configs (moved from tests/integration/test_observability.py: it needs no
service; that module runs every collected query against a real Prometheus)."""

from __future__ import annotations

import doctest

import tests.promqueries
from tests.promqueries import dashboard_queries, operands, raw_metrics, rule_queries


def test_queries_are_found() -> None:
    """Guards against a silent zero: a renamed folder or key would leave nothing to run."""
    ids = [qid for qid, _ in dashboard_queries() + rule_queries()]
    assert sum(i.startswith("panel:") for i in ids) >= 30
    assert sum(i.startswith("alert:") for i in ids) >= 5
    assert any(i.startswith("annotation:Drift") for i in ids)


def test_operands_split_alert_expressions() -> None:
    result = doctest.testmod(tests.promqueries)
    assert result.attempted > 0 and result.failed == 0
    assert operands("rate(a[5m]) > 0 unless on(instance) b == 1") == ["rate(a[5m])", "b"]


def test_recording_rules_are_followed_to_raw_metrics() -> None:
    """A query over a recording rule names the stream_* metrics the rule reads."""
    recorded = [expr for qid, expr in rule_queries() if qid.startswith("record:")]
    assert recorded
    assert all(raw_metrics(name) for name in recorded), recorded
