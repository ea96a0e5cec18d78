"""Paired replay-speed benchmark: this checkout against a baseline commit, same session.

The machine is shared and noisy (the same code has run anywhere from 780 to 1,300 events/s
between hours), so a speed claim is only a ratio of runs that alternate on the same box:
``--rounds`` times, replay MovieLens-100K (blend only) once with the baseline and once with
this tree, each in a fresh process, and report both rates, the median ratio, and whether the
quality metrics differ.

    python -m load_tests.replay_speed --baseline 7dbf7c9 [--rounds 3] [--limit 100000]
        [--report load_tests/results/replay-speed.json]

Each replay process also times river's FunkMF update (the issue quotes ~9 us for it on the
reference machine) before and after its replay, and reports the rate scaled to that speed.

The baseline is checked out with ``git worktree`` under a temporary directory (removed
afterwards). Each run prints one JSON line: events/s from the replay's own wall clock (the
loop only, after loading the file) and its report.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from stream.tools.datasets import default_datasets_dir

ROOT = Path(__file__).resolve().parents[1]

_RUN = """
import json, sys, time
from river import optim, reco
from stream.tools.datasets import load_events
from stream.tools.replay import replay
events = load_events(sys.argv[1], "movielens", limit=int(sys.argv[2]))

def funk_us():  # machine-speed probe: river FunkMF updates, the issue's reference (~9 us)
    funk = reco.FunkMF(n_factors=10, optimizer=optim.SGD(0.05), seed=0)
    t = time.perf_counter()
    for e in events[:20000]:
        funk.learn_one(e.user_id, e.track_id, 1.0)
    return (time.perf_counter() - t) / 20000 * 1e6

replay(events[:2000], variants=("blend",), exclude_seen=True)  # warm-up: imports, JIT cache
before = funk_us()
started = time.perf_counter()
result = replay(events, variants=("blend",), exclude_seen=True)
seconds = time.perf_counter() - started
probe = (before + funk_us()) / 2
print(json.dumps({"events": len(events), "seconds": seconds,
                  "events_per_s": len(events) / seconds,
                  "funkmf_us": probe,
                  "events_per_s_at_reference": len(events) / seconds * probe / REFERENCE_US,
                  "metrics": result.report["variants"]["blend"],
                  "skip": result.report["skip_model"]}))
""".replace("REFERENCE_US", "9.0")


def run_once(tree: Path, dataset: Path, limit: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", _RUN, str(dataset), str(limit)],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"replay in {tree} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="git commit to compare against")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--limit", type=int, default=100_000, help="events (MovieLens-100K: all)")
    p.add_argument("--datasets", type=Path, default=default_datasets_dir())
    p.add_argument("--report", type=Path)
    args = p.parse_args()
    dataset = args.datasets / "movielens-100k"
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="replay-base-") as tmp:
        base = Path(tmp) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base), args.baseline],
            cwd=ROOT, check=True, capture_output=True,
        )
        try:
            for i in range(args.rounds):
                t0 = time.monotonic()
                before = run_once(base, dataset, args.limit)
                after = run_once(ROOT, dataset, args.limit)
                ratio = after["events_per_s"] / before["events_per_s"]
                rows.append({"round": i + 1, "baseline": before, "this_tree": after,
                             "ratio": ratio})
                print(
                    f"[replay-speed] round {i + 1}/{args.rounds}: baseline "
                    f"{before['events_per_s']:,.0f} ev/s, this tree "
                    f"{after['events_per_s']:,.0f} ev/s, ratio {ratio:.2f}x; this tree at the "
                    f"reference speed {after['events_per_s_at_reference']:,.0f} ev/s (FunkMF "
                    f"{after['funkmf_us']:.1f} us here vs 9.0) ({time.monotonic() - t0:.0f} s)",
                    file=sys.stderr,
                )
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT,
                           check=False, capture_output=True)
    last = rows[-1]
    summary = {
        "baseline": args.baseline,
        "events": last["this_tree"]["events"],
        "rounds": rows,
        "median_ratio": statistics.median(r["ratio"] for r in rows),
        "baseline_events_per_s": [round(r["baseline"]["events_per_s"]) for r in rows],
        "this_tree_events_per_s": [round(r["this_tree"]["events_per_s"]) for r in rows],
        # the 5,000 events/s target is an absolute rate on a machine where river's
        # FunkMF update takes ~9 us; the same probe, run in each replay process, scales the
        # measured rate to that speed (the shared VM here drifts 1.7x within an hour)
        "this_tree_events_per_s_at_reference": [
            round(r["this_tree"]["events_per_s_at_reference"]) for r in rows],
        "this_tree_funkmf_us": [round(r["this_tree"]["funkmf_us"], 2) for r in rows],
        "metrics_baseline": last["baseline"]["metrics"],
        "metrics_this_tree": last["this_tree"]["metrics"],
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=1))
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
