"""``warm_up`` must give the worker every compiled signature it uses, so that a worker
started after ``scripts/setup.sh`` loads its kernels from numba's cache and never compiles
on the event loop (issue 15: a 5-25 s stall at the first flush of a fresh install, because
the worker's default ranker took a path the warm-up never ran)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, sys
from numba.core.registry import CPUDispatcher
from stream.core.recommender import warm_up

def signatures():
    out = {}
    for m in list(sys.modules.values()):
        if getattr(m, "__name__", "").startswith("stream."):
            for v in list(vars(m).values()):
                if isinstance(v, CPUDispatcher):
                    key = f"{v.py_func.__module__}.{v.__name__}"
                    out[key] = {str(s) for s in v.signatures}
    return out

warm_up()
before = signatures()
from stream.config import RANKERS, load_settings
from stream.core.events import PlayEvent
from stream.core.session import update_session
from stream.worker.app import configure_recommender

for ranker in RANKERS:
    settings = load_settings(env={}, file=None, ranker=ranker, max_tracks=1000)
    rec = configure_recommender(None, settings)
    states, steps = {}, []
    for i in range(600):
        e = PlayEvent(f"u{i % 11}", f"t{(i * 7919) % 211}", 1_700_000_000_000 + i * 1000,
                      200_000, f"e{i}", artist_id=f"a{i % 13}", skipped=i % 5 == 0)
        update = update_session(states.get(e.user_id), e)
        steps.append(rec.learn_one(update, e).step)
        states[e.user_id] = update.state
        if i % 50 == 49:
            rec.recommend(update.state, 10, e.ts_ms)
            rec.recommend_many(list(states.values()), 10, e.ts_ms)
            rec.rank_items_many(list(states.values()), 10, e.ts_ms)  # the processor's call
            rec.similar(e.track_id, 10)
            rec.component_ids(update.state, 10, e.ts_ms, ("popularity", "mf", "cooccurrence"))
    rec.evict_tracks(150)
    rec.recommend_many(list(states.values()), 10, e.ts_ms)
    rec.rank_items_many(list(states.values()), 10, e.ts_ms)
    rec.similar("t1", 10)
    # a peer applies these plays' item steps (signals), blend rows included
    configure_recommender(None, settings).apply_item_steps([s for s in steps if s])
after = signatures()
print(json.dumps({k: sorted(v - before.get(k, set())) for k, v in after.items()
                  if v - before.get(k, set())}))
"""


def test_the_worker_compiles_no_signature_warm_up_did_not() -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, cwd=root, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    new = json.loads(done.stdout.strip().splitlines()[-1])
    assert new == {}, f"compiled after warm_up (the worker would compile these): {new}"
