"""Where numba keeps the compiled kernels: a directory named after the kernel sources.

numba's on-disk cache (``cache=True``) checks only the file that defines a kernel. A kernel
that calls a kernel of another file (``_blend_kernels.blend_collect`` calls into
``_kernels``, STAN's query calls ``_kernels._top_n``, the rules call ``_kernels.cooc_add``)
would go on loading its old compiled copy after that other file changed, and run the old
code without an error (found by session 13's review). So the cache directory is keyed by
a hash of every file in ``stream/core/models``: any change there starts a fresh directory,
and every kernel is compiled again (``scripts/setup.sh``'s warm-up does it once).

This runs from ``stream/__init__.py``, before numba is imported. An operator who sets
``NUMBA_CACHE_DIR`` themselves keeps it, and with it the duty to empty it after an update.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def sources_digest(models_dir: Path) -> str:
    """A digest of every kernel source file (name and contents) under ``models_dir``."""
    h = hashlib.sha256()
    for path in sorted(models_dir.glob("*.py")):
        h.update(path.name.encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def cache_dir(package: Path = _PACKAGE) -> Path:
    """The cache directory for the kernels of this source tree."""
    return package / "__pycache__" / "numba" / sources_digest(package / "core" / "models")


#: set beside NUMBA_CACHE_DIR when this module chose it, so that a child process running
#: other sources (a baseline tree, a tree updated since) keys its own directory
AUTO_MARK = "STREAM_NUMBA_CACHE_AUTO"


def configure(environ: dict[str, str] | None = None) -> str:
    """Set ``NUMBA_CACHE_DIR`` for these sources (unless an operator set it) and return the
    directory in force. A value this function set in a parent process (marked by
    :data:`AUTO_MARK`) is recomputed, not inherited. Warns if numba was imported first
    (its cache directory is then numba's default, which can go stale)."""
    env = os.environ if environ is None else environ
    current = env.get("NUMBA_CACHE_DIR")
    if not current or current == env.get(AUTO_MARK):
        current = env["NUMBA_CACHE_DIR"] = env[AUTO_MARK] = str(cache_dir())
    numba = sys.modules.get("numba") if environ is None else None
    if numba is not None and getattr(getattr(numba, "config", None), "CACHE_DIR", None) != current:
        warnings.warn(
            "numba was imported before `stream`: its kernel cache is numba's default, which "
            "can run stale kernels after an update; import stream first or set "
            "NUMBA_CACHE_DIR", RuntimeWarning, stacklevel=2)
    return current
