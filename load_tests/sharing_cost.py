"""The cost of sharing item state (issue #17): microseconds a worker spends per signal it
applies (decode + validate + the item step), against learning a play itself, measured in
alternating rounds in one process on the same plays; and what that makes per worker when
each of N workers takes 1,000 plays/s (every worker applies the other N-1 workers' signals).

    python -m load_tests.sharing_cost --dataset ../shared/datasets/30music-200ks \\
        --format sessionrec --plays 20000 --rounds 3 [--ranker learned] --report sharing.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

from stream.core.recommender import Recommender
from stream.core.session import UserState, update_session
from stream.processing.replication import apply_signals, decode_batch, encode_batch, signal_from
from stream.tools.datasets import load_events, load_sessionrec


def one_round(events: list, warm: int, ranker: str) -> tuple[float, float, int]:
    """(us per play learned by its owner, us per signal applied by a receiver, signals)."""
    owner, receiver = (Recommender(seed=0, blend=ranker, session_models=ranker == "learned")
                       for _ in range(2))
    states: dict[str, UserState] = {}
    sigs = []
    learn_s = 0.0
    for i, e in enumerate(events):
        t = time.perf_counter()
        update = update_session(states.get(e.user_id), e)
        learned = owner.learn_one(update, e)
        if i >= warm:
            learn_s += time.perf_counter() - t
        states[e.user_id] = update.state
        sigs.append(signal_from("w0", update, e, learned))
    apply_signals(receiver, sigs[:warm])
    apply_s = 0.0
    rest = sigs[warm:]
    now = events[-1].ts_ms + 1
    for i in range(0, len(rest), 1000):  # the workers' message size
        raw = encode_batch("w0", rest[i : i + 1000])
        t = time.perf_counter()
        decoded = decode_batch(raw, now_ms=now)
        apply_signals(receiver, decoded.signals)
        apply_s += time.perf_counter() - t
    n = len(rest)
    return 1e6 * learn_s / n, 1e6 * apply_s / n, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--format", required=True)
    ap.add_argument("--plays", type=int, default=20_000)
    ap.add_argument("--warm", type=int, default=5_000, help="plays learned before timing")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ranker", choices=("fixed", "learned"), default="fixed",
                    help="the worker's ranker setting (default fixed, the worker's default)")
    ap.add_argument("--report")
    args = ap.parse_args(argv)
    if args.format == "sessionrec":
        events, _ = load_sessionrec(args.dataset, limit=args.plays)
    else:
        events = load_events(args.dataset, args.format, limit=args.plays)
    rows = []
    for _ in tqdm(range(args.rounds), desc="rounds", file=sys.stderr):
        rows.append(one_round(events, args.warm, args.ranker))
    learn = statistics.median(r[0] for r in rows)
    apply = statistics.median(r[1] for r in rows)
    report = {
        "dataset": args.dataset, "plays": len(events), "timed_signals": rows[0][2],
        "ranker": args.ranker,
        "rounds": [{"learn_us_per_play": round(a, 1), "apply_us_per_signal": round(b, 1)}
                   for a, b, _ in rows],
        "learn_us_per_play": round(learn, 1), "apply_us_per_signal": round(apply, 1),
        "apply_over_learn": round(apply / learn, 3),
        "per_worker_at_1000_plays_s": {
            str(n): {"signals_per_s": 1000 * (n - 1),
                     "cpu_share_applying": round(1000 * (n - 1) * apply / 1e6, 3),
                     "cpu_share_own_plays": round(1000 * learn / 1e6, 3)}
            for n in (1, 2, 4, 8)
        },
    }
    print(json.dumps(report, indent=2))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
