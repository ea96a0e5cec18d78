"""``stream replay``: run the recommendation core over a recorded log, test-then-train.

For every event, in timestamp order (ties keep file order): recommend for the listener from
the state *before* the event, with every variant (``popularity``, ``mf``, ``cooccurrence``,
``sknn``, ``stan``, ``sr``, ``fixed``, ``blend``); score whether the played track is in the
top K; then learn from the event. The same :class:`~stream.core.recommender.Recommender` and
:class:`~stream.core.evaluation.Prequential` run inside the worker, so replay numbers are the
worker's numbers.

Example::

    stream replay ../shared/datasets/movielens-100k --format movielens --k 10 \\
        --report replay.json --plot replay.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stream.config import Settings
from stream.core.evaluation import Prequential
from stream.core.events import PlayEvent
from stream.core.recommender import VARIANTS, LearnResult, Recommender, SeenTracks
from stream.core.session import SessionUpdate, UserState, update_session
from stream.tools.datasets import FORMATS, load_events, load_sessionrec

#: Which earlier plays a listener must not be recommended again, by format. MovieLens users
#: rate a film once, so every rated item is excluded; music listeners replay favourites, so
#: only the recent-play filter applies.
EXCLUDE_ALL_SEEN = {"movielens"}
#: the exclusion of a variant when earlier plays may be recommended again
_NO_EXCLUSION: frozenset[str] = frozenset()


@dataclass(slots=True)
class ReplayResult:
    """Everything a replay measured (``report`` is the JSON-ready summary)."""

    report: dict[str, Any]
    hits: dict[str, bytearray] = field(default_factory=dict)


class TestThenTrain:
    """The prequential loop's step, shared by :func:`replay` and ``stream simulate``: score
    every variant's top ``k`` for a play from the listener's state before it, then learn
    from it (``exclude_seen``: never recommend a listener's earlier plays)."""

    __test__ = False  # not a pytest class, whatever its name

    def __init__(
        self, variants: Sequence[str], *, k: int, exclude_seen: bool, max_recent: int
    ) -> None:
        unknown = set(variants) - set(VARIANTS)
        if unknown:
            raise ValueError(f"unknown variant(s) {sorted(unknown)}; expected from {VARIANTS}")
        self.variants, self.k = variants, k
        self.exclude_seen, self.max_recent = exclude_seen, max_recent
        self.evaluator = Prequential(k=k)
        self.seen: dict[str, SeenTracks] = {}
        self.hits = {v: bytearray() for v in variants}
        self.applied = 0

    def play(
        self, rec: Recommender, states: dict[str, UserState], event: PlayEvent
    ) -> tuple[SessionUpdate, LearnResult] | None:
        """Score, then learn ``event`` (``states``: its listener's session table); None for a
        duplicate play, which is skipped."""
        update = update_session(states.get(event.user_id), event, max_recent=self.max_recent)
        if update.duplicate:
            return None
        history: Collection[str] = _NO_EXCLUSION
        if self.exclude_seen:
            user_seen = self.seen.get(event.user_id)
            if user_seen is None:
                user_seen = self.seen[event.user_id] = SeenTracks(rec.vocabulary)
            history = user_seen
        # the ranked rows only (no Recommendation nor reason per item, no track id), every
        # variant's list the one Recommender.recommend returns; the played track's row
        # (-1: new) taken before learning the play adds it
        vocabulary = rec.vocabulary
        played = vocabulary.index.get(event.track_id, -1)
        lists = rec.component_rows(update.before, self.k, event.ts_ms, self.variants,
                                   exclude=history)
        ranks = self.evaluator.observe_rows(self.variants, lists, played, event.track_id,
                                            vocabulary)
        for variant, rank in zip(self.variants, ranks, strict=True):
            self.hits[variant].append(rank is not None)
        learned = rec.learn_one(update, event)
        self.evaluator.observe_skip(learned.skip_probability, learned.skipped)
        states[event.user_id] = update.state
        if self.exclude_seen:
            self.seen[event.user_id].add(event.track_id)
        self.applied += 1
        return update, learned

    def report(
        self, rec: Recommender, *, seed: int, repeats: int, users: int, seconds: float
    ) -> dict[str, Any]:
        """The JSON-ready summary (``rec``: whose drift detector and model version count)."""
        summary = self.evaluator.summary()
        applied = self.applied
        return {
            "events": applied,
            "k": self.k,
            "seed": seed,
            "exclude_seen": self.exclude_seen,
            "repeats": repeats,
            "variants": {
                v: {name: round(value, 6) for name, value in summary[v].items()
                    if name != "events"}
                for v in self.variants
                if v in summary
            },
            "skip_model": {n: round(x, 6) for n, x in summary.get("skip", {}).items()},
            "drift_detections": rec.drift.n_detections,
            "users": users,
            "model_version": rec.model_version,
            "seconds": round(seconds, 3),
            "events_per_second": round(applied / seconds, 1) if seconds > 0 else None,
        }


def replay(
    events: Sequence[PlayEvent],
    *,
    k: int = 10,
    variants: Sequence[str] = VARIANTS,
    exclude_seen: bool = False,
    seed: int = 0,
    max_recent: int = 30,
    recommender: Recommender | None = None,
    progress: bool = False,
    repeats: int = 0,
) -> ReplayResult:
    """Prequential replay of ``events`` (already in time order) -> metrics per variant."""
    step = TestThenTrain(variants, k=k, exclude_seen=exclude_seen, max_recent=max_recent)
    rec = recommender
    if rec is None:
        rec = Recommender(seed=seed, repeats=repeats)
        # nobody reads a replay's item steps (what a worker sends the others): the models
        # learn the same without building them (Recommender.item_steps)
        rec.emit_item_steps(False)
    states: dict[str, UserState] = {}
    started = time.perf_counter()
    for event in tqdm(events, disable=not progress, file=sys.stderr, unit="ev", mininterval=0.5):
        step.play(rec, states, event)
    seconds = time.perf_counter() - started
    report = step.report(rec, seed=seed, repeats=rec.repeats, users=len(states),
                         seconds=seconds)
    return ReplayResult(report, step.hits)


def format_table(report: dict[str, Any]) -> str:
    """The per-variant metrics as an aligned text table."""
    k = report["k"]
    cols = [f"hr@{k}", f"mrr@{k}", f"ndcg@{k}", "coverage"]
    lines = [f"{'variant':<14}" + "".join(f"{c:>10}" for c in cols)]
    for name, metrics in report["variants"].items():
        lines.append(f"{name:<14}" + "".join(f"{metrics[c]:>10.4f}" for c in cols))
    skip = report.get("skip_model") or {}
    if skip:
        lines.append(
            f"skip model: accuracy {skip['accuracy']:.4f}  log-loss {skip['log_loss']:.4f}"
        )
    rate = report.get("events_per_second")
    lines.append(f"{report['events']} events, {rate} events/s, {report['seconds']} s")
    return "\n".join(lines)


def plot_hits(hits: dict[str, bytearray], k: int, out: Path, title: str = "") -> None:
    """PNG of HR@K over the stream per variant: a rolling window and the cumulative rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    for name, flags in hits.items():
        arr = np.frombuffer(bytes(flags), dtype=np.uint8).astype(np.float64)
        if arr.size == 0:
            continue
        window = max(50, arr.size // 40)
        csum = np.cumsum(arr)
        if arr.size > window:
            rolling = (csum[window:] - csum[:-window]) / window
            xs = np.arange(window, arr.size)
            (line,) = ax.plot(
                xs, rolling, linewidth=1.0, alpha=0.8, label=f"{name} (rolling {window})"
            )
            color = line.get_color()
        else:
            color = None
        cumulative = csum / np.arange(1, arr.size + 1)
        ax.plot(np.arange(arr.size), cumulative, linestyle="--", linewidth=1.2, color=color,
                label=f"{name} (cumulative)")
    ax.set_xlabel("events replayed")
    ax.set_ylabel(f"HR@{k}")
    ax.set_title(title or f"Prequential HR@{k} over the stream")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``stream replay`` (returns the exit code)."""
    dropped: int | None = None
    if args.format == "sessionrec":
        events, dropped = load_sessionrec(args.path, limit=args.limit)
        print(f"dropped {dropped} verbatim consecutive copies", file=sys.stderr)
    else:
        events = load_events(args.path, args.format, limit=args.limit)
    if not events:
        print(f"no events in {args.path}", file=sys.stderr)
        return 1
    exclude = args.exclude_seen
    exclude_seen = args.format in EXCLUDE_ALL_SEEN if exclude == "auto" else exclude == "all"
    variants = tuple(args.variants.split(",")) if args.variants else VARIANTS
    if args.workers is not None:
        from stream.tools.simulate import replay_workers

        if args.workers < 1 or args.signal_delay_ms < 0 or args.partitions < 1:
            print("--workers and --partitions must be >= 1, --signal-delay-ms >= 0",
                  file=sys.stderr)
            return 2
        sim_report, sim_hits = replay_workers(
            events, workers=args.workers, signal_delay_ms=args.signal_delay_ms,
            partitions=args.partitions, k=args.k, variants=variants,
            exclude_seen=exclude_seen, seed=args.seed, max_recent=args.max_recent,
            progress=not args.no_progress, repeats=args.repeats,
        )
        result = ReplayResult(sim_report, sim_hits)
    else:
        result = replay(
            events,
            k=args.k,
            variants=variants,
            exclude_seen=exclude_seen,
            seed=args.seed,
            max_recent=args.max_recent,
            progress=not args.no_progress,
            repeats=args.repeats,
        )
    report = {"dataset": str(args.path), "format": args.format, **result.report}
    if dropped is not None:
        report["dropped_copies"] = dropped
    print(format_table(report))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if args.plot:
        plot_hits(result.hits, args.k, Path(args.plot),
                  title=f"{Path(args.path).name}: prequential HR@{args.k}")
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``replay`` subcommand to an argparse sub-parsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "replay",
        help="replay a recorded log through the recommender, test-then-train",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("path", help="log file, or the dataset folder")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--k", type=int, default=10, help="list length (default 10)")
    p.add_argument("--report", help="write the metrics as JSON here")
    p.add_argument("--plot", help="write a PNG of HR@K over the stream here")
    p.add_argument("--limit", type=int, help="replay only the first N events (by time)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--exclude-seen", choices=("auto", "all", "recent"), default="auto",
                   help="exclude every earlier play of the listener (all) or only recent "
                   "plays (recent); auto = all for movielens, recent otherwise")
    p.add_argument("--max-recent", type=int, default=30,
                   help="recent tracks kept per listener (session state)")
    p.add_argument("--repeats", type=int, default=0,
                   help="let the learned blend recommend the listener's last N distinct tracks "
                   "again once out of the recent filter (0: off)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--workers", type=int,
                   help="simulate N workers: listeners split by the producer's partitioner, "
                   "item-side learning shared through signals (stream/tools/simulate.py); the "
                   "report adds \"workers\" and \"signals\"")
    p.add_argument("--signal-delay-ms", type=int, default=1000,
                   help="with --workers: event-time delay before the other workers apply "
                   "a play's signal (default 1000)")
    p.add_argument("--partitions", type=int, default=Settings().partitions,
                   help="with --workers: partitions of the plays topic (default: the "
                   "worker's default, %(default)s)")
    p.set_defaults(func=run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stream.tools.replay ...`` (same arguments as ``stream replay``)."""
    parser = argparse.ArgumentParser(prog="stream")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["replay", *(sys.argv[1:] if argv is None else argv)])
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
