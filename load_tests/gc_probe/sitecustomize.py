"""The cyclic GC's collections in every Python process started with this directory first on
``PYTHONPATH`` (``load_tests.gc_drain`` matches them to a throughput run's drains):

    PYTHONPATH=load_tests/gc_probe:$PWD GC_PROBE_DIR=/tmp/gc python -m load_tests.throughput ...
    python -m load_tests.gc_drain /tmp/gc load_tests/results/<run>/throughput.json

Each process writes ``gc-<pid>.json`` (its argv and one ``[time, generation, seconds,
collected]`` per collection) every 100 collections and at exit. Not a project module.
"""

import atexit
import gc
import json
import os
import sys
import time

_DIR = os.environ.get("GC_PROBE_DIR", "/tmp")
_started = [0.0]
_collections: list[tuple[float, int, float, int]] = []


def _callback(phase: str, info: dict, _clock=time.perf_counter) -> None:  # type: ignore[type-arg]
    if phase == "start":
        _started[0] = _clock()
        return
    _collections.append((time.time(), info["generation"], _clock() - _started[0],
                         info["collected"]))
    if len(_collections) % 100 == 0:
        _dump()


def _dump() -> None:
    with open(os.path.join(_DIR, f"gc-{os.getpid()}.json"), "w") as f:
        json.dump({"argv": sys.argv, "collections": _collections,
                   "thresholds": gc.get_threshold()}, f)


gc.callbacks.append(_callback)
atexit.register(_dump)
