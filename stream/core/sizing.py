"""Approximate deep memory size of Python objects, cheap enough to run every few seconds.

Exact deep sizing walks every object; a model with a million-entry dict would stall the
worker's event loop. :func:`approx_size_bytes` walks containers fully up to ``sample`` items
and extrapolates from a sample beyond that. numpy arrays count their buffer (``nbytes``).
Good to within tens of percent -- enough for a memory-growth panel and alert, not for billing.

>>> approx_size_bytes([1, 2, 3]) > 0
True
>>> import numpy as np
>>> approx_size_bytes(np.zeros(1000)) >= 8000
True
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Mapping
from itertools import islice
from typing import Any

try:  # numpy is a dependency of the models; keep this module importable without it
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None  # type: ignore[assignment]

_ATOMS = (int, float, complex, bool, str, bytes, bytearray, type(None))


def approx_size_bytes(
    obj: Any, sample: int = 64, _depth: int = 0, _seen: set[int] | None = None
) -> int:
    """Estimated bytes held by ``obj`` and what it references (shared objects counted once)."""
    seen = _seen if _seen is not None else set()
    oid = id(obj)
    if oid in seen:
        return 0
    seen.add(oid)
    if _np is not None and isinstance(obj, _np.ndarray):
        # getsizeof of an array that owns its buffer already includes it; a view only
        # counts its header (the buffer belongs to its base)
        return int(sys.getsizeof(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, _ATOMS) or _depth > 12:
        return size
    if isinstance(obj, Mapping):
        n = len(obj)
        items = list(islice(obj.items(), sample))
        d = _depth + 1
        part = sum(
            approx_size_bytes(k, sample, d, seen) + approx_size_bytes(v, sample, d, seen)
            for k, v in items
        )
        return size + _extrapolate(part, len(items), n)
    if isinstance(obj, (list, tuple, set, frozenset, deque)):
        n = len(obj)
        items = list(islice(iter(obj), sample))
        part = sum(approx_size_bytes(v, sample, _depth + 1, seen) for v in items)
        return size + _extrapolate(part, len(items), n)
    attrs = getattr(obj, "__dict__", None)
    if attrs is not None:
        size += approx_size_bytes(attrs, sample, _depth + 1, seen)
    for slot in _slots(type(obj)):
        if hasattr(obj, slot):
            size += approx_size_bytes(getattr(obj, slot), sample, _depth + 1, seen)
    return size


def _extrapolate(part: int, sampled: int, total: int) -> int:
    if sampled == 0:
        return 0
    return part if sampled >= total else int(part * total / sampled)


def _slots(cls: type) -> list[str]:
    names: list[str] = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names.extend([slots] if isinstance(slots, str) else list(slots))
    return [n for n in names if n not in ("__dict__", "__weakref__")]


def model_memory_bytes(recommender: object, sample: int = 64) -> dict[str, int]:
    """Per-model size estimate: every attribute of ``recommender`` that has ``learn_one``.

    Label values are attribute names from the code (a small fixed set), never data.
    """
    out: dict[str, int] = {}
    for name, value in vars(recommender).items():
        if name.startswith("_") and not hasattr(value, "learn_one"):
            continue
        if hasattr(value, "learn_one"):
            out[name.lstrip("_")] = approx_size_bytes(value, sample)
    return out
