"""Hyperparameter sweep for the session models and the learned blend (issue 19).

Replays one dataset (test-then-train, as ``stream replay``) once per setting and prints
HR@10 / MRR@10 per variant. A setting is a JSON object of ``Recommender`` keyword arguments
(``stan_params``, ``rules_params``, ``blend_params``, ``blend_candidates``, ...)::

    python -m load_tests.session_sweep ../shared/datasets/30music-200ks --format sessionrec \\
        --exclude-seen all --limit 30000 --variants stan,sknn \\
        --grid '{"stan_params": {"lambda_position": 1.0}}' \\
               '{"stan_params": {"lambda_position": 4.0}}'

Use ``--limit`` for a subset (and say so when quoting the numbers).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from stream.core.recommender import VARIANTS, Recommender
from stream.tools.datasets import FORMATS, load_events
from stream.tools.replay import replay


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("path")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--limit", type=int)
    p.add_argument("--exclude-seen", choices=("all", "recent"), default="all")
    p.add_argument("--variants", default="stan,sknn,sr,cooccurrence,blend")
    p.add_argument("--grid", nargs="+", default=["{}"], help="JSON Recommender kwargs each")
    p.add_argument("--report", help="append one JSON line per setting here")
    args = p.parse_args(argv)
    variants = tuple(args.variants.split(","))
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}")
    events = load_events(args.path, args.format, limit=args.limit)
    print(f"{len(events)} events from {args.path}", file=sys.stderr)
    for text in args.grid:
        params: dict[str, Any] = json.loads(text)
        started = time.perf_counter()
        result = replay(events, variants=variants, exclude_seen=args.exclude_seen == "all",
                        recommender=Recommender(**params))
        seconds = time.perf_counter() - started
        row = {v: (round(m["hr@10"], 4), round(m["mrr@10"], 4))
               for v, m in result.report["variants"].items()}
        print(json.dumps({"params": params, "hr_mrr": row, "seconds": round(seconds, 1)}),
              flush=True)
        if args.report:
            with open(args.report, "a") as fh:
                fh.write(json.dumps({"path": args.path, "limit": args.limit,
                                     "exclude_seen": args.exclude_seen, "params": params,
                                     "report": result.report}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
