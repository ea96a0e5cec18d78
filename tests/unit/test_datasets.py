"""Loaders for the real logs (read from ../shared/datasets, never copied)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.tools.datasets import DatasetError, load_events


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


def test_sessionrec_folder_drops_verbatim_copies(datasets_dir: Path) -> None:
    from stream.tools.datasets import load_sessionrec

    folder = datasets_dir / "30music-200ks"
    events, dropped = load_sessionrec(folder)
    raw = sum(len(f.read_text().splitlines()) - 1 for f in sorted(folder.iterdir()))
    assert dropped > 0 and len(events) + dropped == raw
    assert all(a.ts_ms <= b.ts_ms for a, b in zip(events, events[1:], strict=False))
    assert all(e.session_id and e.artist_id for e in events)
    assert load_events(folder, "sessionrec", limit=10) == events[:10]
    users = {e.user_id for e in events}
    assert len(users) == 2487


def test_sessionrec_files_in_name_order_and_bad_header(tmp_path: Path) -> None:
    from stream.tools.datasets import load_sessionrec

    head = "UserId\tSessionId\tItemId\tTime\tArtistId\n"
    (tmp_path / "b.1.txt").write_text(head + "u\t8\tx\t100\ta\n")
    (tmp_path / "a.0.txt").write_text(head + "u\t7\ty\t100\ta\nu\t7\ty\t100\ta\nu\t7\ty\t101\ta\n")
    events, dropped = load_sessionrec(tmp_path)
    assert dropped == 1  # only the verbatim copy; the same track a second later stays
    # ties on time keep the files' name order
    assert [(e.track_id, e.session_id) for e in events] == [("y", "7"), ("x", "8"), ("y", "7")]
    (tmp_path / "c.txt").write_text("user\tsession\n")
    with pytest.raises(DatasetError, match="expected the header"):
        load_sessionrec(tmp_path)
