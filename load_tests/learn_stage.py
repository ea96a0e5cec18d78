"""CPU time of the learn stage per play, in-process (dict table, no Kafka or Redis), as the
worker's processor runs it (live evaluator, per-component quality every
``quality_components_every`` plays, deferred ranking): ``Processor._learn_and_rank`` and,
inside it, ``Recommender.learn_one``, over the second half of a synthetic stream
(``SessionTraffic``). Like a worker without ``worker_keys`` (no signals: the recommender
builds no item steps where it can tell, see ``Recommender.emit_item_steps``) unless
``--signals``. Runs on this tree or, with ``PYTHONPATH`` at an older checkout
(before the #16 layout move), on that one: compare trees alternating, in one sitting.

    python -m load_tests.learn_stage [--plays 12000] [--rounds 3]
    PYTHONPATH=/tmp/perf-base python -m load_tests.learn_stage      # e.g. 507be7a
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from pathlib import Path
from typing import Any

from load_tests.traffic import SessionTraffic
from stream.config import load_settings


def _modules() -> dict[str, Any]:
    import stream

    # the layout after issue #16 (looked up on disk: an editable install of another
    # checkout would otherwise serve stream.core to an older tree)
    if (Path(stream.__file__).parent / "core").is_dir():
        return {"rec": importlib.import_module("stream.core.recommender"),
                "pipe": importlib.import_module("stream.processing.pipeline"),
                "events": importlib.import_module("stream.core.events"),
                "eval": importlib.import_module("stream.core.evaluation")}
    return {"rec": importlib.import_module("stream.recommender"),
            "pipe": importlib.import_module("stream.pipeline"),
            "events": importlib.import_module("stream.events"),
            "eval": importlib.import_module("stream.evaluation")}


def run(plays: int, every: str, signals: bool = False) -> dict[str, float]:
    """Microseconds of CPU per play: (learn stage, learn_one) over the second half."""
    mods = _modules()
    now = int(time.time() * 1000)
    record = mods["pipe"].Record
    records = [record("plays", 0, i, ev.user_id.encode(), mods["events"].encode_event(ev), now)
               for i, ev in enumerate(SessionTraffic().events(plays))]
    settings = load_settings(env={"STREAM_QUALITY_COMPONENTS_EVERY": every}, file=None)
    rec = mods["rec"].Recommender(blend=settings.ranker,
                                  session_models=settings.ranker == "learned")
    emit_steps = getattr(rec, "emit_item_steps", None)
    if callable(emit_steps):  # as create_worker does (older trees always build them)
        emit_steps(signals)
    proc = mods["pipe"].Processor(
        settings, rec, {}, lambda w: None, lambda d: None, defer_ranking=True,
        evaluator=mods["eval"].Prequential(k=10, window=settings.quality_window))
    spent = {"learn stage": 0.0, "learn_one": 0.0}
    timing = [False]

    def timed(obj: Any, name: str, label: str) -> None:
        inner = getattr(obj, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                if timing[0]:
                    spent[label] += time.process_time() - t
        setattr(obj, name, wrapper)

    timed(rec, "learn_one", "learn_one")
    timed(proc, "_learn_and_rank", "learn stage")
    half = (len(records) // 2) // 64 * 64
    for start in range(0, len(records), 64):
        timing[0] = start >= half
        proc.process_batch(records[start : start + 64])
        proc.rank_pending()
    return {k: v / (len(records) - half) * 1e6 for k, v in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plays", type=int, default=12_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--components-every", default="10",
                        help="quality_components_every (0: off)")
    parser.add_argument("--signals", action="store_true",
                        help="as a worker that sends signals (item steps built)")
    args = parser.parse_args()
    rounds = []
    for r in range(args.rounds):
        got = run(args.plays, args.components_every, args.signals)
        rounds.append(got)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f} us" for k, v in got.items()),
              flush=True)
    print("median: " + ", ".join(
        f"{k} {statistics.median(g[k] for g in rounds):.1f} us/play CPU" for k in rounds[0]))


if __name__ == "__main__":
    main()
