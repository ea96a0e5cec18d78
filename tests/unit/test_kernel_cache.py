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


def test_importing_stream_points_numba_at_the_keyed_directory() -> None:
    code = "import stream, numba; print(numba.config.CACHE_DIR)"
    env = {k: v for k, v in __import__("os").environ.items() if k != "NUMBA_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True, timeout=120)
    assert out.stdout.strip() == str(_kernel_cache.cache_dir())
