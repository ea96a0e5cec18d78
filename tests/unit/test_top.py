"""``stream top``: exposition parsing, windowed rates and histogram percentiles, rendering."""

from __future__ import annotations

import io
import math

import pytest

from stream.tools.top import Scrape, View, bucket_delta, histogram_quantile, render, run

# Two scrapes of a worker one second apart, in the format prometheus_client serves.
FIRST = """\
# HELP stream_events_total Play events consumed, by outcome.
# TYPE stream_events_total counter
stream_events_total{outcome="processed",topic="plays"} 1000.0
stream_events_total{outcome="rejected",topic="plays"} 10.0
stream_events_total{outcome="duplicate",topic="plays"} 0.0
# TYPE stream_dlq_writes_total counter
stream_dlq_writes_total{topic="plays"} 10.0
# TYPE stream_stage_seconds histogram
stream_stage_seconds_bucket{le="0.001",stage="rank"} 900.0
stream_stage_seconds_bucket{le="0.01",stage="rank"} 1000.0
stream_stage_seconds_bucket{le="+Inf",stage="rank"} 1000.0
stream_stage_seconds_count{stage="rank"} 1000.0
stream_stage_seconds_sum{stage="rank"} 0.9
stream_stage_seconds_bucket{le="0.001",stage="decode"} 1000.0
stream_stage_seconds_bucket{le="0.01",stage="decode"} 1000.0
stream_stage_seconds_bucket{le="+Inf",stage="decode"} 1000.0
stream_stage_seconds_count{stage="decode"} 1000.0
stream_stage_seconds_sum{stage="decode"} 0.1
# TYPE stream_freshness_seconds histogram
stream_freshness_seconds_bucket{le="0.1"} 0.0
stream_freshness_seconds_bucket{le="1.0"} 0.0
stream_freshness_seconds_bucket{le="+Inf"} 0.0
stream_freshness_seconds_count 0.0
stream_freshness_seconds_sum 0.0
# TYPE stream_consumer_lag_messages gauge
stream_consumer_lag_messages{partition="0",topic="plays"} 5.0
stream_consumer_lag_messages{partition="1",topic="plays"} 40.0
# TYPE stream_quality_hr_at_10 gauge
stream_quality_hr_at_10{variant="blend"} 0.25
stream_quality_hr_at_10{variant="popularity"} 0.1
# TYPE stream_quality_ndcg_at_10 gauge
stream_quality_ndcg_at_10{variant="blend"} 0.125
stream_quality_ndcg_at_10{variant="popularity"} 0.05
# TYPE stream_plays_total counter
stream_plays_total{context="radio"} 200.0
stream_plays_total{context="album"} 0.0
# TYPE stream_skips_total counter
stream_skips_total{context="radio"} 50.0
stream_skips_total{context="album"} 0.0
# TYPE stream_build info
stream_build_info{app_id="demo",model_version="blend-1",version="0.1.0"} 1.0
"""

SECOND = (
    FIRST.replace('"processed",topic="plays"} 1000.0', '"processed",topic="plays"} 1500.0')
    # 500 new rank observations, all between 1 ms and 10 ms
    .replace('stream_stage_seconds_bucket{le="0.01",stage="rank"} 1000.0',
             'stream_stage_seconds_bucket{le="0.01",stage="rank"} 1500.0')
    .replace('stream_stage_seconds_bucket{le="+Inf",stage="rank"} 1000.0',
             'stream_stage_seconds_bucket{le="+Inf",stage="rank"} 1500.0')
    .replace('stream_stage_seconds_count{stage="rank"} 1000.0',
             'stream_stage_seconds_count{stage="rank"} 1500.0')
)


def test_parse_sums_and_groups() -> None:
    s = Scrape.parse(FIRST, at=100.0)
    assert s.total("stream_events_total") == 1010.0
    assert s.total("stream_events_total", outcome="rejected") == 10.0
    assert s.by("stream_consumer_lag_messages", "partition") == {"0": 5.0, "1": 40.0}
    assert s.buckets("stream_stage_seconds", stage="rank") == [
        (0.001, 900.0), (0.01, 1000.0), (math.inf, 1000.0)
    ]


def test_histogram_quantile_matches_prometheus_semantics() -> None:
    b = [(0.001, 900.0), (0.01, 1000.0), (math.inf, 1000.0)]
    assert histogram_quantile(0.5, b) == pytest.approx(0.001 * 500 / 900)  # from 0 in bucket 1
    assert histogram_quantile(0.95, b) == pytest.approx(0.001 + 0.009 * 50 / 100)
    assert histogram_quantile(1.0, b) == pytest.approx(0.01)
    # a rank in the +Inf bucket: the highest finite bound, as Prometheus does
    assert histogram_quantile(0.99, [(0.1, 10.0), (math.inf, 100.0)]) == 0.1
    assert histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None
    assert histogram_quantile(0.5, []) is None


def test_rates_and_windowed_percentiles_use_the_difference_of_two_scrapes() -> None:
    view = View(Scrape.parse(SECOND, at=101.0), Scrape.parse(FIRST, at=100.0))
    assert view.rate("stream_events_total", outcome="processed") == pytest.approx(500.0)
    # all 500 observations of the last second fell in (1 ms, 10 ms]
    p50, p99 = view.quantiles("stream_stage_seconds", (0.5, 0.99), stage="rank")
    assert p50 == pytest.approx(0.001 + 0.009 * 0.5)
    assert p99 == pytest.approx(0.001 + 0.009 * 0.99)
    # decode saw nothing new: fall back to the all-time distribution rather than "-"
    (d50,) = view.quantiles("stream_stage_seconds", (0.5,), stage="decode")
    assert d50 == pytest.approx(0.0005)


def test_counter_reset_falls_back_to_current_counts() -> None:
    now = [(1.0, 5.0), (math.inf, 5.0)]
    assert bucket_delta(now, [(1.0, 50.0), (math.inf, 50.0)]) == now
    assert bucket_delta(now, [(1.0, 1.0), (math.inf, 2.0)]) == [(1.0, 4.0), (math.inf, 3.0)]


def test_render_shows_the_headline_numbers() -> None:
    text = render(View(Scrape.parse(SECOND, 101.0), Scrape.parse(FIRST, 100.0)), "http://w/m")
    assert "processed 500.0/s (1,500)" in text
    assert "lag 45 messages, max 40 on plays[1]" in text
    assert "blend" in text and "0.250" in text and "0.125" in text
    assert "radio 25.0%" in text and "album" not in text.split("skip rate")[1].split("\n")[0]
    assert text.index("  decode") < text.index("  rank")  # pipeline order
    assert "worker demo" in text


def test_run_is_bounded_and_survives_an_unreachable_worker() -> None:
    pages = iter([OSError("connection refused"), FIRST, SECOND])
    clock = iter([100.0, 101.0, 102.0])

    def get(url: str) -> str:
        page = next(pages)
        if isinstance(page, Exception):
            raise page
        return page

    out = io.StringIO()
    rc = run("http://w/m", 0.0, 3, out=out, clear=False, get=get, sleep=lambda s: None,
             clock=lambda: next(clock))
    assert rc == 0
    frames = out.getvalue()
    assert "cannot read metrics" in frames
    assert "totals since start" in frames and "processed 500.0/s" in frames


def test_run_fails_when_no_scrape_succeeds() -> None:
    def get(url: str) -> str:
        raise OSError("refused")

    assert run("http://w/m", 0.0, 2, out=io.StringIO(), clear=False, get=get,
               sleep=lambda s: None) == 1
