"""CPU (``time.process_time``) of the blend-only replay's loop over MovieLens' first 10,000
plays after start-up: the replay's own ``TestThenTrain`` (as ``stream replay --variants
blend`` runs it, every rated film excluded) after the first 10 plays, which load the
kernels, so no separate start-up run is subtracted. The optional argument is a garbage
collector mode: ``none`` (the default, as ``stream replay`` runs), ``freeze``
(``gc.freeze()`` first), ``disable``, ``thresh`` (gen-0 threshold 10,000) or
``freeze+thresh``.

    PYTHONPATH=. python load_tests/blend_replay_loop.py [none|freeze|disable|thresh]
"""

from __future__ import annotations

import gc
import sys
import time

from stream.core.recommender import Recommender
from stream.core.session import UserState
from stream.tools.datasets import load_events
from stream.tools.replay import TestThenTrain

DATA = "/work/shared/datasets/movielens-100k"
PLAYS = 10_000
MODES = ("none", "freeze", "disable", "thresh", "freeze+thresh")


def main(mode: str = "none") -> float:
    """The loop's CPU seconds for plays 10..PLAYS under ``mode`` (printed too)."""
    if mode not in MODES:
        raise SystemExit(f"mode: one of {MODES}")
    events = load_events(DATA, "movielens", limit=PLAYS)
    rec = Recommender(seed=0)
    rec.emit_item_steps(False)
    step = TestThenTrain(("blend",), k=10, exclude_seen=True, max_recent=30)
    states: dict[str, UserState] = {}
    for e in events[:10]:
        step.play(rec, states, e)  # loads the kernels
    if "freeze" in mode:
        gc.collect(1)
        gc.freeze()
    if mode == "disable":
        gc.disable()
    if "thresh" in mode:
        gc.set_threshold(10_000, 10, 10)
    started = time.process_time()
    for e in events[10:]:
        step.play(rec, states, e)
    cpu = time.process_time() - started
    print(f"{mode:14s} {cpu:.3f} s")
    return cpu


if __name__ == "__main__":
    main(*sys.argv[1:2])
