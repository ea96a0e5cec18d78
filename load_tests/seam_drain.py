"""The Faust seam's own cost: Faust's count-only agent with the worker's Faust adaptations
(``LT_FAST_DRAIN=1 python -m load_tests.count_app``: in-loop consumer, direct hand-over,
commit-flush producer; no table, no Redis), this tree against a baseline commit, alternating
drain by drain over one pre-filled topic, a fresh consumer group each.

    python -m load_tests.seam_drain --baseline 501c183 --count 20000 --rounds 3

Prints each drain's events/s (first to last event) and the paired ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from load_tests.common import ROOT, base_settings, baseline_tree, run_id
from load_tests.throughput import prefill


def drain(tree: Path, topic: str, n: int, timeout_s: float, log_dir: Path, name: str) -> float:
    """Run count_app from ``tree`` until it has counted ``n`` events; its events/s."""
    progress = log_dir / f"{name}.progress"
    env = {**os.environ, "PYTHONPATH": str(tree), "LT_APP_ID": f"{log_dir.name}-{name}",
           "LT_TOPIC": topic, "LT_PROGRESS": str(progress), "LT_EXPECT": str(n),
           "LT_EVERY": "1000", "LT_FAST_DRAIN": "1"}
    with open(log_dir / f"{name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "load_tests.count_app", "worker"],
                                cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
        points: list[tuple[float, int]] = []
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline and not (points and points[-1][1] >= n):
                time.sleep(0.5)
                if progress.exists():
                    points = [(float(t), int(c)) for t, c, *_ in
                              (line.split() for line in progress.read_text().splitlines())
                              if c != "0"]
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if not points or points[-1][1] < n or points[-1][0] <= points[0][0]:
        return float("nan")
    return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, metavar="COMMIT")
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=180.0, help="per drain, seconds")
    args = ap.parse_args(argv)
    rid = run_id("seam")
    topic = f"{rid}-plays"
    settings = base_settings().replace(plays_topic=topic, dlq_topic=f"{topic}-dlq")
    fill = asyncio.run(prefill(settings, topic, "synthetic", args.count, 120.0, rid))
    n = int(fill["sent"])
    log_dir = ROOT / "load_tests" / "results" / rid
    log_dir.mkdir(parents=True, exist_ok=True)
    rates: dict[str, list[float]] = {"baseline": [], "this tree": []}
    with baseline_tree(args.baseline) as base:
        assert base is not None
        for i in range(args.rounds):
            for label, tree in (("baseline", base), ("this tree", ROOT)):
                rate = drain(tree, topic, n, args.timeout, log_dir, f"{label[:4]}{i + 1}")
                rates[label].append(rate)
                print(f"round {i + 1} {label}: {rate:,.0f} events/s", flush=True)
    for label, values in rates.items():
        print(f"{label} median: {sorted(values)[len(values) // 2]:,.0f} events/s")
    pairs = [t / b for t, b in zip(rates["this tree"], rates["baseline"], strict=True)]
    print("this tree / baseline per round: " + ", ".join(f"{p:.3f}" for p in pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
