"""Summarise loaded integration-suite runs (issue 21; scripts/loaded-suite-run.sh) as JSON.

usage: python scripts/loaded-suite-summary.py OUT_DIR > summary.json
Reads OUT_DIR/run-N.{meta,log,load} for every run and prints one entry per run: commit, start
and end, exit code, duration, pytest's summary line, the failed tests, the load average and
the burner's CPU share sampled once a minute.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path


def _stats(values: list[float]) -> dict[str, float | int] | None:
    if not values:
        return None
    return {"min": min(values), "median": round(statistics.median(values), 2),
            "max": max(values), "samples": len(values)}


def run_entry(out: Path, label: str) -> dict[str, object]:
    meta = (out / f"{label}.meta").read_text()
    log_lines = (out / f"{label}.log").read_text(errors="replace").splitlines()
    load = (out / f"{label}.load").read_text() if (out / f"{label}.load").exists() else ""
    start = re.search(r"^start (\S+) commit (\S+)", meta, re.M)
    end = re.search(r"^end (\S+) rc (\d+) duration_s (\d+)", meta, re.M)
    summary = next((line.strip("= ") for line in reversed(log_lines)
                    if re.search(r"\d+ (passed|failed|error)", line)), "")
    failures = [line.split(" ", 1)[1] for line in log_lines
                if line.startswith(("FAILED ", "ERROR "))]
    loads = [float(m) for m in re.findall(r"load=([\d.]+)", load)]
    burner = [float(m) for m in re.findall(r"burner_cpu=([\d.]+)", load)]
    return {
        "run": label,
        "commit": start.group(2) if start else None,
        "started_utc": start.group(1) if start else None,
        "ended_utc": end.group(1) if end else None,
        "exit_code": int(end.group(2)) if end else None,
        "duration_s": int(end.group(3)) if end else None,
        "pytest_summary": summary,
        "failures": failures,
        "load_average_1m": _stats(loads),
        "burner_cpu_pct_median": round(statistics.median(burner), 1) if burner else None,
    }


def main() -> None:
    out = Path(sys.argv[1])
    labels = sorted({p.stem for p in out.glob("run-*.meta")},
                    key=lambda s: int(s.split("-")[1]))
    print(json.dumps([run_entry(out, label) for label in labels], indent=1))


if __name__ == "__main__":
    main()
