"""Static checks that keep the shape the project wants: ruff and mypy clean (strict on the
pure core), the core and the processing layer never importing Kafka, Redis, Faust or
Prometheus -- not even indirectly -- and no function longer than a screenful."""

from __future__ import annotations

import ast
import json
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


def test_mypy_clean() -> None:
    """mypy on all of stream/ (strict on the core: pyproject's overrides)."""
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "stream"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:]


# --------------------------------------------------------------------------- a sealed core
#: the pure packages: no Kafka, Redis, Faust or Prometheus, not even indirectly
SEALED = ["stream/core", "stream/processing", "stream/config.py", "stream/errors.py"]
#: stream packages the sealed modules must not import either (they import the libraries)
IMPURE_PACKAGES = ("stream.adapters", "stream.faustx", "stream.worker", "stream.tools")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def sealed_modules() -> list[str]:
    out: list[str] = []
    for entry in SEALED:
        p = ROOT / entry
        out.extend(module_name(f) for f in (sorted(p.rglob("*.py")) if p.is_dir() else [p]))
    return out


def imported_names(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (lazy imports included),
    as absolute names (``from x import y`` counts ``x`` and ``x.y``)."""
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" \
        else module_name(path)
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def stream_file(name: str) -> Path | None:
    rel = Path(*name.split("."))
    for candidate in (ROOT / rel.with_suffix(".py"), ROOT / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_chain(start: str) -> dict[str, str]:
    """Every module reachable from ``start`` through imports (stream modules are followed;
    others are leaves), each with the module that imports it."""
    seen: dict[str, str] = {start: ""}
    todo = [start]
    while todo:
        name = todo.pop()
        path = stream_file(name)
        if path is None:
            continue
        for imported in imported_names(path):
            # a package's __init__ runs before any of its modules
            pieces = imported.split(".")
            for i in range(1, len(pieces) + 1):
                step = ".".join(pieces[:i])
                if step not in seen:
                    seen[step] = name
                    todo.append(step)
    return seen


@pytest.mark.parametrize("module", sealed_modules())
def test_sealed_module_imports_no_io_transitively(module: str) -> None:
    """Static: no import anywhere in the module's code, or in any stream module it reaches."""
    for name, importer in import_chain(module).items():
        root = name.split(".")[0]
        assert root not in FORBIDDEN, f"{module} reaches {name} (imported by {importer})"
        assert not name.startswith(IMPURE_PACKAGES), (
            f"{module} reaches {name} (imported by {importer})"
        )


def test_sealed_modules_load_no_io_library() -> None:
    """Dynamic: importing every sealed module (in a fresh interpreter) loads none of the
    forbidden libraries, whatever third-party code does underneath."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {sealed_modules()!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.splitlines()[-1])
    bad = [m for m in loaded if m.split(".")[0] in FORBIDDEN or m.startswith(IMPURE_PACKAGES)]
    assert not bad, f"importing the sealed modules loads {bad[:10]}"


def test_import_check_catches_an_indirect_import(tmp_path: Path) -> None:
    """The static check follows stream imports: a core module importing a stream module
    that imports redis inside a function is caught."""
    assert "redis" in import_chain("stream.adapters.redis_store")
    assert "stream.adapters.redis_store" in import_chain("stream.worker.writer")


# --------------------------------------------------------------------------- function length
#: the longest a function in stream/ may be (lines, decorators and docstring included)
MAX_FUNCTION_LINES = 100
#: functions allowed to be longer, and why
LONG_FUNCTION_EXEMPTIONS = {
    # metric declarations: one statement per metric, each with its help text
    ("stream/adapters/metrics.py", "Metrics.__init__"),
}


def _is_numba_kernel(node: ast.AST) -> bool:
    for deco in getattr(node, "decorator_list", ()):
        target = deco.func if isinstance(deco, ast.Call) else deco
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name in ("njit", "jit", "vectorize", "guvectorize"):
            return True
    return False


def _visit(node: ast.AST, prefix: str, rel: str, out: list[tuple[int, str, str]]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            name = f"{prefix}{child.name}"
            first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
            assert child.end_lineno is not None
            if not _is_numba_kernel(child):
                out.append((child.end_lineno - first + 1, rel, name))
            _visit(child, f"{name}.", rel, out)
        elif isinstance(child, ast.ClassDef):
            _visit(child, f"{prefix}{child.name}.", rel, out)


def function_lengths() -> list[tuple[int, str, str]]:
    """(lines, file, qualified name) of every function in stream/ but the numba kernels."""
    out: list[tuple[int, str, str]] = []
    for path in sorted((ROOT / "stream").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        _visit(ast.parse(path.read_text(), filename=rel), "", rel, out)
    return out


def test_no_function_longer_than_a_screen() -> None:
    too_long = [
        f"{rel}: {name} is {n} lines"
        for n, rel, name in function_lengths()
        if n > MAX_FUNCTION_LINES and (rel, name) not in LONG_FUNCTION_EXEMPTIONS
    ]
    assert not too_long, "\n".join(too_long)


def test_function_length_exemptions_are_current() -> None:
    """Each exemption names a function that exists and still needs it."""
    lengths = {(rel, name): n for n, rel, name in function_lengths()}
    for key in LONG_FUNCTION_EXEMPTIONS:
        assert lengths.get(key, 0) > MAX_FUNCTION_LINES, f"exemption not needed: {key}"
