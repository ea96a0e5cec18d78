"""Where an all-variant replay's time goes: thread CPU of the replay's compiled calls and
Python steps, per play (session 19), by wrapping them (each wrapper adds ~0.5 us a call)::

    python -m load_tests.variant_replay_attribution --limit 10000
    python -m load_tests.variant_replay_attribution --limit 10000 --variants blend

MovieLens-100K (``--exclude-seen all`` semantics, as ``stream replay`` runs it); numba's
caches should be warm (a first run compiles).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import stream.core.evaluation as evaluation
import stream.core.models._blend_kernels as bk
import stream.core.recommender as recommender
from stream.core.recommender import VARIANTS
from stream.tools.datasets import load_events
from stream.tools.replay import replay

_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "movielens-100k"
_WRAPPED = (
    (bk, "blend_collect_variants"), (bk, "blend_collect"), (bk, "blend_rank"),
    (recommender.Recommender, "component_rows"), (recommender.Recommender, "_learned_order"),
    (recommender.Recommender, "_blend_inputs"), (recommender.Recommender, "learn_one"),
    (recommender.Recommender, "_result_rows"), (recommender.Recommender, "_finish_session"),
    (recommender._VariantShare, "unpacked"), (evaluation.Prequential, "observe_rows"),
)


def _wrap(owner: Any, name: str, spent: dict[str, float], calls: dict[str, int]) -> None:
    inner: Callable[..., Any] = getattr(owner, name)
    clock = time.thread_time

    def timed(*args: Any, **kwargs: Any) -> Any:
        t = clock()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[name] += clock() - t
            calls[name] += 1

    setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=10_000)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--data", type=Path, default=_DATA)
    args = parser.parse_args()
    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for owner, name in _WRAPPED:
        _wrap(owner, name, spent, calls)
    events = load_events(args.data, "movielens", limit=args.limit)
    t = time.thread_time()
    replay(events, exclude_seen=True, variants=tuple(args.variants.split(",")))
    total = time.thread_time() - t
    n = len(events)
    print(f"replay loop {total:.3f} s CPU, {1e6 * total / n:.1f} us a play ({n} plays)")
    for name in sorted(spent, key=lambda x: -spent[x]):
        print(f"{name:26s} {1e6 * spent[name] / n:7.1f} us a play  ({calls[name]} calls)")


if __name__ == "__main__":
    main()
