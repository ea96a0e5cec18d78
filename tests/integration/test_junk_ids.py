"""The junk-ids drill, CI-sized (the long run: ``python -m load_tests.faults junk-ids
--count 1000000``; results in docs/benchmarks.md, "Memory under hostile ids").

A real worker with small caps (``max_tracks=1000``, ``max_users=500``) gets 3,000 plays
whose track, user and artist ids are all new, plus real Last.fm listeners' plays. The
models stay within the caps (evictions and MF user drops happen), the worker stays up,
and every real play reaches its listener's Redis list. Timings (loop lag, latency) are in
the report, not asserted: they belong to the benchmark.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from load_tests import faults
from load_tests.junk_ids import drill_settings, junk_ids
from stream.config import Settings

pytestmark = pytest.mark.integration


def test_junk_ids_stay_within_the_caps_and_real_listeners_keep_their_lists(
    settings: Settings, worker_factory: Callable[..., faults.Worker], tmp_path: Path
) -> None:
    s = drill_settings(settings, max_tracks=1000, max_users=500)
    report = junk_ids(s, worker_factory, count=3000, seconds=60.0, rate=300.0,
                      real_rate=4.0, sample_s=1.0, plot=tmp_path / "junk.png")
    detail = json.dumps({k: v for k, v in report.items() if k != "series"}, indent=1)
    assert report["worker_alive"], detail
    assert report["junk_sent"] == 3000 and report["events_applied"] >= 3000, detail
    assert report["evictions"] >= 1 and 0 < report["catalogue_end"] <= 1000, detail
    assert all(p["catalogue"] <= 1000 + 64 for p in report["series"]), detail  # one batch
    assert report["mf_users_evicted"] >= 3000 - 500, detail
    listeners = report["real_listeners"]
    assert listeners and all(v["sent"] > 0 and v["applied_in_redis"] == v["sent"]
                             for v in listeners.values()), detail
    assert report["redis_keys_deleted"] > 3000, detail
    assert (tmp_path / "junk.png").stat().st_size > 0
