"""Metric functions against hand-computed cases; the prequential evaluator's windows."""

from __future__ import annotations

import math

import pytest

from stream.core.evaluation import (
    Prequential,
    hit_at_k,
    log_loss,
    ndcg_at_k,
    rank_of,
    reciprocal_rank_at_k,
)

RECS = ["a", "b", "c", "d"]


def test_rank_hit_rr_ndcg_by_hand() -> None:
    assert rank_of(RECS, "c", 4) == 2
    assert rank_of(RECS, "c", 2) is None
    assert hit_at_k(RECS, "a", 1) == 1.0
    assert hit_at_k(RECS, "d", 3) == 0.0
    assert reciprocal_rank_at_k(RECS, "b", 4) == 0.5
    assert reciprocal_rank_at_k(RECS, "z", 4) == 0.0
    assert ndcg_at_k(RECS, "a", 4) == 1.0
    assert ndcg_at_k(RECS, "c", 4) == pytest.approx(1 / math.log2(4))  # rank 3 -> 1/log2(4) = 0.5
    assert ndcg_at_k([], "a", 10) == 0.0


def test_log_loss_by_hand_and_clipped() -> None:
    assert log_loss(0.8, True) == pytest.approx(-math.log(0.8))
    assert log_loss(0.8, False) == pytest.approx(-math.log(0.2))
    assert math.isfinite(log_loss(0.0, True))


def test_prequential_summary_matches_hand_computation() -> None:
    ev = Prequential(k=2)
    ev.observe("m", ["a", "b"], "a")  # hit at rank 1
    ev.observe("m", ["a", "b"], "b")  # hit at rank 2
    ev.observe("m", ["a", "b", "c"], "c")  # outside the top 2: a miss
    ev.observe("m", ["x"], "d")
    s = ev.summary()["m"]
    assert s["hr@2"] == pytest.approx(2 / 4)
    assert s["mrr@2"] == pytest.approx((1 + 0.5) / 4)
    assert s["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    # catalogue = {a, b, c, d}; recommended within top 2: {a, b, x} -> a, b are in it
    assert s["coverage"] == pytest.approx(3 / 4)
    assert s["events"] == 4


def test_window_keeps_only_recent_events() -> None:
    ev = Prequential(k=1, window=2)
    for actual in ["a", "a", "b", "b"]:
        ev.observe("v", ["a"], actual)
    assert ev.summary()["v"]["hr@1"] == 0.0
    assert ev.summary()["v"]["events"] == 2
    assert ev.summary(cumulative=True)["v"]["hr@1"] == 0.5


def test_skip_accuracy_and_log_loss() -> None:
    ev = Prequential(k=10, window=2)
    ev.observe_skip(0.9, True)
    ev.observe_skip(0.2, True)
    ev.observe_skip(0.1, False)
    windowed = ev.summary()["skip"]
    assert windowed["accuracy"] == 0.5
    assert windowed["log_loss"] == pytest.approx((-math.log(0.2) - math.log(0.9)) / 2)
    assert ev.summary(cumulative=True)["skip"]["accuracy"] == pytest.approx(2 / 3)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Prequential(k=0)
    with pytest.raises(ValueError):
        Prequential(window=0)


def test_windowed_coverage_counts_the_lists_still_in_the_window() -> None:
    import random

    rng = random.Random(5)
    ev = Prequential(k=3, window=50)
    history: list[tuple[list[str], str]] = []
    for _ in range(400):
        top = [f"t{rng.randrange(200)}" for _ in range(3)]
        actual = f"t{rng.randrange(200)}"
        ev.observe("blend", top, actual)
        history.append((top, actual))
    window = history[-50:]
    shown = {t for top, _ in window for t in top}
    catalogue = {actual for _, actual in history}
    assert ev.summary()["blend"]["coverage"] == pytest.approx(len(shown) / len(catalogue))
    whole = {t for top, _ in history for t in top}
    assert ev.summary(cumulative=True)["blend"]["coverage"] == pytest.approx(
        min(len(whole) / len(catalogue), 1.0)
    )
