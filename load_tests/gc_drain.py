"""The GC collections of the workers of a throughput run that fall inside each drain (from
``load_tests/gc_probe``; see its docstring):

    python -m load_tests.gc_drain /tmp/gc load_tests/results/<run>/throughput.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    probe_dir, report = (argv or sys.argv[1:])[:2]
    results = json.loads(Path(report).read_text())["results"]
    drains = {}
    for name, res in results.items():
        series = [p for p in res.get("series", []) if p[1] > 0]
        if series:
            drains[name] = (series[0][0], res["series"][-1][0])
    for path in sorted(Path(probe_dir).glob("gc-*.json")):
        probe = json.loads(path.read_text())
        if "worker" not in probe["argv"]:
            continue
        for name, (start, end) in drains.items():
            inside = [c for c in probe["collections"] if start <= c[0] <= end]
            if not inside:
                continue
            per_gen = {g: [c[2] for c in inside if c[1] == g] for g in (0, 1, 2)}
            spent = sum(c[2] for c in inside)
            print(f"{path.name} thresholds {probe['thresholds']}: {name}, drain "
                  f"{end - start:.1f} s: " + ", ".join(
                      f"gen{g} {len(v)} x = {sum(v) * 1e3:.0f} ms" for g, v in per_gen.items())
                  + f"; {spent * 1e3:.0f} ms = {spent / (end - start):.1%} of the drain")
    return 0


if __name__ == "__main__":
    sys.exit(main())
