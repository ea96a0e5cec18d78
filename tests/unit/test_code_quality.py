"""Static checks that keep the shape the project wants: ruff clean, mypy strict on the pure
core, and the core never importing Kafka, Redis or Prometheus."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = [
    "stream/core/events.py",
    "stream/core/session.py",
    "stream/processing/control.py",
    "stream/core/checkpoint.py",
    "stream/core/recommender.py",
    "stream/core/ranking.py",
    "stream/core/catalog.py",
    "stream/core/evaluation.py",
    "stream/core/contexts.py",
    "stream/core/models",
]
FORBIDDEN = ("faust", "mode", "aiokafka", "kafka", "redis", "prometheus_client")


def core_files() -> list[Path]:
    out: list[Path] = []
    for entry in CORE:
        p = ROOT / entry
        out.extend(sorted(p.rglob("*.py")) if p.is_dir() else [p])
    return out


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_imports_no_io_libraries(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


def test_ruff_clean() -> None:
    ruff = shutil.which("ruff")
    assert ruff, "ruff is a dev dependency: pip install -e '.[dev]'"
    proc = subprocess.run(
        [ruff, "check", "stream", "tests", "load_tests"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_mypy_strict_on_core() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", *CORE], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
