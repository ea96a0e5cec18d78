"""The worker's lazily mapped per-track arrays are faulted in with small pages (issue 15,
item 5; docs/benchmarks.md, "The junk-ids drill, session 14"): with numpy's transparent
huge page advice, the first write into each 2 MiB of a reserved array faulted in the whole
huge page on the event loop (20-104 ms per fault in-process; most likely the drill's 578 ms)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stream.worker.heap import no_transparent_huge_pages

# In a fresh interpreter (numpy's advice is process-wide and set at its import): whether
# numpy advises huge pages after the worker configured its recommender (or not), and how
# many huge pages writing one value per 2 MiB of a new 16 MiB array faulted in.
_PROBE = """
import json, sys
import numpy as np
from stream.config import Settings
from stream.worker.app import configure_recommender

def anon_huge_kb():
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0

import ctypes
if sys.argv[1] == "worker":
    configure_recommender(None, Settings())
else:  # the default, whatever the parent process (the flag is inherited) set
    ctypes.CDLL(None).prctl(41, 0, 0, 0, 0)  # PR_SET_THP_DISABLE off
before = anon_huge_kb()
rows = np.zeros((131_072, 32), dtype=np.float32)  # 16 MiB, like the reserved MF rows
for r in range(0, len(rows), 16_384):  # one write per 2 MiB, as new tracks arrive
    rows[r] = 1.0
grown = anon_huge_kb() - before
advice = np._core.multiarray._set_madvise_hugepage(False)  # returns the setting it replaces
import ctypes
thp_disabled = ctypes.CDLL(None).prctl(42, 0, 0, 0, 0)  # PR_GET_THP_DISABLE
print(json.dumps({"advice": bool(advice), "huge_kb": grown, "thp_disabled": thp_disabled}))
"""


def _probe(mode: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = str(root)
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True,
                          text=True, env=env, timeout=120, check=True)
    out: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "never"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else "never"


def test_the_worker_turns_numpy_huge_page_advice_off_so_new_rows_fault_small_pages() -> None:
    plain = _probe("plain")
    worker = _probe("worker")
    assert plain["advice"] is True  # numpy's default on Linux: the cause
    assert worker["advice"] is False
    assert worker["huge_kb"] == 0
    # and none whatever the host's mode (enabled=always needs no advice)
    assert worker["thp_disabled"] == 1 and plain["thp_disabled"] == 0
    if _thp_mode() == "madvise":  # here numpy's advice is what makes them huge
        assert plain["huge_kb"] and int(str(plain["huge_kb"])) > 0


def test_an_operators_own_numpy_huge_page_setting_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
    assert no_transparent_huge_pages() is True
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "0")
    assert no_transparent_huge_pages() is False


def test_a_numpy_without_the_switch_fails_loudly_naming_it_and_the_way_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import numpy as np

    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    monkeypatch.delattr(np._core.multiarray, "_set_madvise_hugepage")
    with pytest.raises(RuntimeError,
                       match="_set_madvise_hugepage not found.*NUMPY_MADVISE_HUGEPAGE=0"):
        no_transparent_huge_pages()


def test_the_turn_budget_cannot_be_smaller_than_the_probes_interval() -> None:
    from stream.worker.watchdog import LoopLagProbe, TurnBudget

    with pytest.raises(ValueError, match="turn budget"):
        LoopLagProbe(on_lag=lambda s: None, interval_s=0.01, turns=TurnBudget(0.005))
    LoopLagProbe(on_lag=lambda s: None, interval_s=0.01, turns=TurnBudget(0.01))
