"""The queries the shipped Grafana dashboards and Prometheus rules run, collected for
tests (tests/integration/test_observability.py runs each against a real Prometheus;
tests/unit/test_dashboard_queries.py checks the collection itself)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "configs" / "grafana" / "dashboards"
RULES = ROOT / "configs" / "prometheus" / "rules"


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
