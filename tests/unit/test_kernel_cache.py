"""The numba kernel cache is keyed by the kernel sources (stream/_kernel_cache.py): numba
checks only a kernel's own file, so a kernel calling into a changed file of another module
kept running its old compiled copy (session 13's review reproduced it with blend_collect)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from stream import _kernel_cache


def _tree(root: Path, kernels: str, blend: str) -> Path:
    models = root / "core" / "models"
    models.mkdir(parents=True)
    (models / "_kernels.py").write_text(kernels)
    (models / "_blend_kernels.py").write_text(blend)
    return root


def test_a_change_to_any_kernel_file_gives_a_new_cache_directory(tmp_path: Path) -> None:
    a = _tree(tmp_path / "a", "acc[d] += c\n", "from . import _kernels\n")
    b = _tree(tmp_path / "b", "acc[d] += 2.0 * c\n", "from . import _kernels\n")  # callee changed
    c = _tree(tmp_path / "c", "acc[d] += c\n", "from . import _kernels\n")
    assert _kernel_cache.cache_dir(a).name != _kernel_cache.cache_dir(b).name
    assert _kernel_cache.cache_dir(a).name == _kernel_cache.cache_dir(c).name
    assert _kernel_cache.cache_dir(a).parent == a / "__pycache__" / "numba"


def test_an_operators_numba_cache_dir_is_kept() -> None:
    env = {"NUMBA_CACHE_DIR": "/srv/numba"}
    assert _kernel_cache.configure(env) == "/srv/numba"
    env = {}
    assert _kernel_cache.configure(env) == str(_kernel_cache.cache_dir())
    assert env["NUMBA_CACHE_DIR"] == str(_kernel_cache.cache_dir())


def test_a_directory_chosen_by_a_parent_process_is_recomputed_not_inherited() -> None:
    """Review of session 13: a child inherited its parent's keyed directory as if an
    operator had set it, so a tree updated since (or a baseline tree) used the old key."""
    env = {"NUMBA_CACHE_DIR": "/old/tree/__pycache__/numba/0123",
           _kernel_cache.AUTO_MARK: "/old/tree/__pycache__/numba/0123"}
    assert _kernel_cache.configure(env) == str(_kernel_cache.cache_dir())
    assert env[_kernel_cache.AUTO_MARK] == str(_kernel_cache.cache_dir())


def test_importing_stream_points_numba_at_the_keyed_directory() -> None:
    code = "import stream, numba; print(numba.config.CACHE_DIR)"
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("NUMBA_CACHE_DIR", _kernel_cache.AUTO_MARK)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True, timeout=120)
    assert out.stdout.strip() == str(_kernel_cache.cache_dir())


def test_numba_imported_before_stream_is_reported() -> None:
    code = "import warnings; warnings.simplefilter('error'); import numba; import stream"
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("NUMBA_CACHE_DIR", _kernel_cache.AUTO_MARK)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode != 0 and "imported before `stream`" in out.stderr
