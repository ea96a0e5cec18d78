"""Loaders for the real logs (read from ../shared/datasets, never copied)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.datasets import DatasetError, load_events


def test_lastfm_sample(datasets_dir: Path) -> None:
    events = load_events(datasets_dir / "lastfm-1k-sample", "lastfm")
    assert len(events) == 5000
    assert {e.user_id for e in events} == {"user_000001", "user_000002"}
    assert all(a.ts_ms <= b.ts_ms for a, b in zip(events, events[1:], strict=False))
    assert all(e.artist_id for e in events)
    assert len({e.event_id for e in events}) >= 4990  # scrobbles can repeat exactly


def test_spotify_sample_has_skip_labels_and_context(datasets_dir: Path) -> None:
    events = load_events(datasets_dir / "spotify-mssd-sample", "spotify")
    assert len(events) == 201 and len({e.user_id for e in events}) == 11
    assert any(e.skipped for e in events) and any(e.skipped is False for e in events)
    assert all(e.context and e.session_id for e in events)


def test_movielens_limit_and_order(datasets_dir: Path) -> None:
    events = load_events(datasets_dir / "movielens-100k", "movielens", limit=1000)
    assert len(events) == 1000
    assert all(a.ts_ms <= b.ts_ms for a, b in zip(events, events[1:], strict=False))


def test_generic_csv(tmp_path: Path) -> None:
    f = tmp_path / "x.csv"
    f.write_text("user_id,item_id,timestamp,skipped\nu1,i1,1700000001,0\nu2,i2,1700000000,1\n")
    events = load_events(f, "csv")
    assert [e.user_id for e in events] == ["u2", "u1"]
    assert events[0].skipped is True and events[1].skipped is False


def test_bad_inputs_have_clear_errors(tmp_path: Path) -> None:
    f = tmp_path / "x.csv"
    f.write_text("a,b\n1,2\n")
    with pytest.raises(DatasetError, match="lacks"):
        load_events(f, "csv")
    with pytest.raises(DatasetError, match="unknown format"):
        load_events(f, "parquet")
    with pytest.raises(DatasetError, match="no such file"):
        load_events(tmp_path / "missing.tsv", "lastfm")
