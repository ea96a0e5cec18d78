"""py-spy sampling of a running worker, summarised as self/inclusive time per function.

``py-spy`` is not a project dependency (``pip install py-spy``); without it profiling is
skipped with a message. Used by ``--profile`` in load_tests.throughput and .freshness; by
hand on any running worker:

    python -m load_tests.profile --pid 1234 --seconds 20
    python -m load_tests.profile --attribute load_tests/results/<run>/worker.pyspy.txt

``--attribute`` splits a worker profile into its parts (:data:`WORKER_PARTS`: each sample
counts for the first part with a function on its stack), as in docs/benchmarks.md
"Session 13: P1". Profile less than the drain lasts: py-spy samples for the whole
``--seconds``, and after a drain the worker's timers fill the profile.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")


def start(pid: int, seconds: float, out: Path, rate: int = 200) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy")
    if exe is None:
        print("py-spy not installed (pip install py-spy): no profile", file=sys.stderr)
        return None
    return subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(max(1, seconds))),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen[bytes] | None, timeout: float = 120.0) -> None:
    if proc is None:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(10)


def _name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({path})"


def summarise(raw: Path, top: int = 25) -> dict[str, Any]:
    """Collapsed stacks -> share of samples per function: self (leaf) and inclusive."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    idle = 0
    try:
        lines = raw.read_text(errors="replace").splitlines()
    except OSError:
        return {"error": f"no profile at {raw}"}
    for line in lines:
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        n = int(count_s)
        frames = [_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        leaf = frames[-1]
        if leaf.startswith(("select (", "poll (", "epoll", "_run_once")) or "selectors.py" in leaf:
            idle += n
        self_c[leaf] += n
        for f in set(frames):
            incl[f] += n
    if total == 0:
        return {"error": "empty profile"}
    return {
        "samples": total,
        "idle_share": idle / total,
        "self": [(f, c / total) for f, c in self_c.most_common(top)],
        "inclusive": [(f, c / total) for f, c in incl.most_common(top * 2)],
    }


#: the worker's parts ("name | functions"), each named by functions on a sample's stack
#: (the first part that matches a sample counts it)
_PARTS = """
decode (parse, key/partition checks) | parse_event partition_problem
session state (update_session, table) | Processor._apply_session
learn: per-component quality (sampled rankings) | ComponentQuality.observe
learn: Recommender.learn_one | Recommender.learn_one
learn: evaluator, catalogue, queueing | Processor._learn_and_rank
process_batch, rest | Processor.process_batch
rank: kernel and results | Processor._rank_entries
rank: documents (_publish) | Processor._publish
rank: rest | Processor.rank_pending Ranker.run
session changelog send | PlaysAgent._send_changelog
agent, rest (live, pace, telemetry, ack, after) | PlaysAgent.run
similar-list refresh timer | Timers.refresh_similar
track-name read-back timer | CatalogSync.resolve_names
other timers | around_timer
Redis writer | RecoWriter AbstractConnection _AsyncHiredisParser
Kafka fetch (Faust fetcher, seam delivery, aiokafka) | Fetcher. _read_ready
Kafka produce and commit | Sender. GroupCoordinator Consumer._commit_handler
/metrics HTTP thread | process_request_thread serve_forever
event loop select | EpollSelector.select
"""
WORKER_PARTS: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
    (name.strip(), tuple(keys.split()))
    for name, keys in (line.split(" | ") for line in _PARTS.strip().splitlines())
)


def attribute(raw: Path) -> tuple[int, list[tuple[str, float]]]:
    """(samples, [(part, share)]) of a collapsed py-spy profile (see WORKER_PARTS)."""
    counts = dict.fromkeys([name for name, _ in WORKER_PARTS] + ["other"], 0)
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        total += int(count_s)
        part = next((name for name, keys in WORKER_PARTS if any(k in stack for k in keys)),
                    "other")
        counts[part] += int(count_s)
    return total, [(name, c / max(total, 1)) for name, c in counts.items()]


def print_summary(summary: dict[str, Any], top: int = 15) -> None:
    if "error" in summary:
        print(f"  profile: {summary['error']}")
        return
    print(
        f"  py-spy: {summary['samples']:,} samples, idle (waiting in select) "
        f"{summary['idle_share']:.0%}"
    )
    print("  top self time:")
    for f, share in summary["self"][:top]:
        print(f"    {share:6.1%}  {f}")
    print("  top inclusive (project code):")
    shown = 0
    for f, share in summary["inclusive"]:
        if "stream/" in f or "load_tests/" in f:
            print(f"    {share:6.1%}  {f}")
            shown += 1
            if shown >= top:
                break


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m load_tests.profile")
    ap.add_argument("--pid", type=int)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--out", default="/tmp/worker.pyspy.txt")
    ap.add_argument("--attribute", metavar="RAW", help="split a worker profile into parts")
    args = ap.parse_args(argv)
    if args.attribute:
        total, parts = attribute(Path(args.attribute))
        print(f"{total:,} samples")
        for name, share in parts:
            print(f"  {share:6.1%}  {name}")
        return 0
    if args.pid is None:
        ap.error("--pid or --attribute")
    proc = start(args.pid, args.seconds, Path(args.out))
    finish(proc, args.seconds + 60)
    print_summary(summarise(Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
