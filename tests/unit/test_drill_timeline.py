"""load_tests.drill_timeline: the per-second timeline and freshness of a drill's notifications
(pure arithmetic on collected notifications; the drills themselves run against the clusters)."""

from __future__ import annotations

from pathlib import Path

from load_tests.drill_timeline import NotificationListener, freshness, per_second, plot_timeline


def note(event_id: str, generated_at: int) -> dict[str, object]:
    return {"event_id": event_id, "generated_at": generated_at}


def listener_with(notes: list[tuple[float, dict[str, object]]]) -> NotificationListener:
    listener = NotificationListener(connect=lambda: None)  # type: ignore[arg-type,return-value]
    listener.notes = list(notes)  # type: ignore[arg-type]
    return listener


def test_per_second_buckets_freshness_and_leaves_quiet_seconds_empty() -> None:
    sent = {"a": 1_000, "b": 1_000, "c": 5_000}
    during = [(100.2, note("a", 1_010)), (100.9, note("b", 1_400)), (102.5, note("c", 7_000))]
    tl = per_second(during, sent, start=100.0, end=102.7)
    assert tl["second"] == [0, 1, 2]
    assert tl["notifications"] == [2, 0, 1]
    assert tl["freshness_p50_ms"] == [400, None, 2_000]
    assert tl["freshness_p99_ms"] == [400, None, 2_000]


def test_per_second_counts_only_notifications_of_plays_this_drill_sent() -> None:
    tl = per_second([(0.5, note("other", 9)), (0.6, {"seq": 3})], {"a": 1}, start=0.0, end=0.9)
    assert tl["notifications"] == [0]


def test_freshness_summarises_the_window_and_its_longest_gap() -> None:
    sent = {f"e{i}": 0 for i in range(100)}
    notes = [(10.0 + i * 0.1, note(f"e{i}", i)) for i in range(100)]
    notes.append((30.0, note("e0", 0)))  # outside the window: not counted
    got = freshness(listener_with(notes), sent, start=10.0, end=25.0)
    assert got["notifications"] == 100
    assert got["freshness_p50_ms"] == 50
    assert got["freshness_p99_ms"] == 99
    assert got["freshness_max_ms"] == 99
    # last notification at 19.9 s, window ends at 25 s
    assert got["longest_gap_without_updates_s"] == 5.1
    assert sum(got["timeline"]["notifications"]) == 100


def test_freshness_without_notifications_reports_none_and_the_whole_window_as_gap() -> None:
    got = freshness(listener_with([]), {}, start=0.0, end=3.0)
    assert got["notifications"] == 0 and got["freshness_p99_ms"] is None
    assert got["longest_gap_without_updates_s"] == 3.0


def test_plot_timeline_writes_a_png_with_the_marks(tmp_path: Path) -> None:
    sent = {"a": 0, "b": 0}
    report = {
        **freshness(listener_with([(0.5, note("a", 5)), (2.5, note("b", 900))]), sent, 0.0, 3.0),
        "marks": [{"at_s": 1.0, "event": "kill"}, {"at_s": 2.0, "event": "promotion"}],
    }
    out = tmp_path / "drill.png"
    plot_timeline(report, out, title="t", xlabel="s")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
