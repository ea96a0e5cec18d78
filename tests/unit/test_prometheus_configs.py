"""The shipped Prometheus config, rules and promtool rule tests are valid.

promtool comes with Debian's ``prometheus`` package (the same one ``stream stack up`` runs).
A missing promtool is a FAILURE, not a skip: these checks are the proof that every alert
fires and resolves.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from stream.tools import stack

PROM = Path(__file__).resolve().parents[2] / "configs" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool not on PATH: install Debian's 'prometheus' package")
    return found


def run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{out}"
    return out


def test_check_config_as_shipped(promtool: str) -> None:
    run([promtool, "check", "config", str(PROM / "prometheus.yml")])


def test_check_config_as_rendered_by_the_stack(
    promtool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local stack rewrites targets and rule paths; the result must load the real rules."""
    monkeypatch.setenv("STREAM_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("STREAM_STACK_METRICS_TARGETS", raising=False)
    rendered = stack.prometheus_config(stack.StackConfig.from_env())
    text = rendered.read_text()
    assert '"127.0.0.1:8000"' in text and f'"127.0.0.1:{stack.TEST_METRICS_PORT}"' in text
    assert str(PROM / "rules") in text
    out = run([promtool, "check", "config", str(rendered)])
    assert "stream.yml" in out and "SUCCESS" in out


def test_check_rules(promtool: str) -> None:
    rules = sorted((PROM / "rules").glob("*.yml"))
    assert rules, "no rule files shipped"
    run([promtool, "check", "rules", *map(str, rules)])


def test_alert_rule_unit_tests(promtool: str) -> None:
    tests = sorted((PROM / "tests").glob("*.yml"))
    assert tests, "no promtool rule tests shipped"
    out = run([promtool, "test", "rules", *map(str, tests)])
    assert "FAILED" not in out


def test_every_alert_has_a_firing_and_a_resolving_test() -> None:
    import yaml

    alerts = {
        rule["alert"]
        for path in (PROM / "rules").glob("*.yml")
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    fires: set[str] = set()
    resolves: set[str] = set()
    for path in (PROM / "tests").glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else resolves).add(check["alertname"])
    assert alerts >= {
        "StreamWorkerDown",
        "StreamConsumerLagGrowing",
        "StreamDeadLetterRateHigh",
        "StreamFreshnessP99High",
        "StreamLiveHitRateDropping",
    }
    assert alerts - fires == set(), "alerts without a test that fires them"
    assert alerts - resolves == set(), "alerts without a test that they stay quiet/resolve"
