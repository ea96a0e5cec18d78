"""The worker keeps numpy's BLAS to one thread (docs/benchmarks.md, "Loop stalls, session
16"): OpenBLAS split "more like this"'s matrix-vector product over both cores and spun
while waiting, which held the event loop up to 273 ms on a busy box. An operator's own
thread setting wins."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# In a fresh interpreter (the BLAS thread count is process-wide): the BLAS libraries'
# thread counts after the worker configured its recommender, and what it returned.
_PROBE = """
import json
from threadpoolctl import threadpool_info
from stream.config import Settings
from stream.worker.app import configure_recommender
from stream.worker.heap import one_blas_thread

before = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
configure_recommender(None, Settings())
after = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
print(json.dumps({"before": before, "after": after, "again": one_blas_thread()}))
"""


def _probe(env_extra: dict[str, str]) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_the_worker_runs_blas_on_one_thread() -> None:
    result = _probe({})
    # numpy's OpenBLAS is found, with a thread per core: on one core the limit shows nothing
    assert max(result["before"]) >= 2, "needs >= 2 CPUs to show the limit"  # type: ignore[call-overload]
    assert result["after"] == [1] * len(result["before"])  # type: ignore[arg-type]
    assert result["again"] == 1


def test_an_operator_thread_setting_is_left_alone() -> None:
    result = _probe({"OPENBLAS_NUM_THREADS": "2"})
    assert result["after"] == result["before"] and result["after"]  # left alone
    assert result["again"] is None
