"""Digests of everything the in-process pipeline produces from a synthetic stream, to show
that a speed-up of the learn stage changed no output: the published documents, each play's
outcome and skip prediction, the item steps (with ``--steps``), the live quality summary
(blend, the per-component variants, skip), the learned state's bytes, the sessions and the
catalogue's owed writes. Run it in each tree and compare the lines (they must be equal):

    cd /path/to/tree && PYTHONPATH=$PWD python /path/to/learn_outputs.py [--plays 12000]
        [--ranker fixed|learned] [--steps]

Standalone on purpose (it imports only ``stream`` and ``load_tests.traffic``), so it runs
against a checkout that does not have it. Deterministic: the clock is fixed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from typing import Any

from load_tests.traffic import SessionTraffic
from stream.config import load_settings
from stream.core.checkpoint import pack_state
from stream.core.evaluation import Prequential
from stream.core.events import encode_event
from stream.core.recommender import Recommender
from stream.processing.pipeline import Processor, Record

NOW_MS = 1_765_000_000_000


def _digest(value: Any) -> str:
    raw = value if isinstance(value, bytes) else repr(value).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def _step_fields(step: Any) -> tuple[Any, ...]:
    return (step.track_id, step.ts_ms, step.skipped, step.history, step.artist_id,
            step.context, step.position, step.session,
            None if step.factors is None else step.factors.tobytes(), step.negatives,
            sorted((step.skip_features or {}).items()), step.seq,
            None if step.blend_pairs is None else step.blend_pairs.tobytes())


def run(plays: int, ranker: str, steps: bool) -> dict[str, str]:
    """The digest per output of ``plays`` synthetic plays through the processor."""
    records = [Record("plays", 0, i, ev.user_id.encode(), encode_event(ev), NOW_MS)
               for i, ev in enumerate(SessionTraffic().events(plays))]
    settings = load_settings(env={"STREAM_RANKER": ranker}, file=None)
    rec = Recommender(blend=settings.ranker, session_models=settings.ranker == "learned")
    emit_steps = getattr(rec, "emit_item_steps", None)
    if callable(emit_steps):  # older trees always build them
        emit_steps(steps)
    writes: list[Any] = []
    table: dict[Any, Any] = {}
    proc = Processor(settings, rec, table, writes.append, lambda d: None, defer_ranking=True,
                     evaluator=Prequential(k=10, window=settings.quality_window),
                     clock=lambda: NOW_MS / 1000)
    outcomes: list[Any] = []
    stepped: list[Any] = []
    for start in range(0, len(records), 64):
        for out in proc.process_batch(records[start : start + 64]) or ():
            learned = out.learned
            outcomes.append((out.outcome, None if learned is None else (
                learned.skip_probability, learned.skipped, learned.drift)))
            step = getattr(learned, "step", None)
            if steps and step is not None:
                stepped.append(_step_fields(step))
        proc.rank_pending()
    assert proc.evaluator is not None
    return {
        "writes": _digest([(w.key, w.seq, w.doc, w.notification, w.event_ts_ms,
                            w.ingest_ts_ms, w.lineage, w.fresh) for w in writes]),
        "outcomes": _digest(outcomes),
        "item steps": _digest(stepped),
        "quality": _digest(json.dumps([proc.evaluator.summary(cumulative=c)
                                       for c in (True, False)], sort_keys=True)),
        "state": _digest(pack_state(*rec.export_state())),
        "sessions": _digest(sorted((k, repr(v)) for k, v in table.items())),
        "catalogue": _digest((sorted(proc.catalog.take_changes().items()),
                              sorted(proc.catalog.take_counts().items()))),
        "counts": f"{len(writes)} writes, {len(outcomes)} outcomes, {len(stepped)} steps",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plays", type=int, default=12_000)
    parser.add_argument("--ranker", default="fixed", choices=("fixed", "learned"))
    parser.add_argument("--steps", action="store_true",
                        help="build the item steps (a worker that sends signals)")
    args = parser.parse_args()
    for name, value in run(args.plays, args.ranker, args.steps).items():
        print(f"{name:10s} {value}")


if __name__ == "__main__":
    main()
