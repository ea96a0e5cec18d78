"""Ranking: blend, filters, per-artist cap, reasons; and the Recommender end to end."""

from __future__ import annotations

import numpy as np
import pytest

from stream.core.events import PlayEvent
from stream.core.ranking import normalise, rank_tracks
from stream.core.recommender import Recommender, SnapshotError
from stream.core.session import UserState, update_session

T0 = 1_700_000_000_000


def test_normalise_scales_non_negative_and_signed_scores() -> None:
    assert normalise(np.array([0.0, 2.0, 1.0])).tolist() == [0.0, 1.0, 0.5]
    assert normalise(np.array([-1.0, 1.0, 0.0])).tolist() == [0.0, 1.0, 0.5]
    assert normalise(np.array([3.0, 3.0])).tolist() == [1.0, 1.0]
    assert normalise(np.array([-2.0, -2.0])).tolist() == [0.0, 0.0]
    assert normalise(np.zeros(0)).size == 0


def test_blend_orders_by_weighted_sum_and_filters_excluded() -> None:
    recs = rank_tracks(
        ["a", "b", "c", "d"],
        {
            "cooccurrence": np.array([1.0, 0.0, 0.5, 0.9]),
            "popularity": np.array([0.0, 1.0, 1.0, 0.0]),
        },
        weights={"cooccurrence": 1.0, "popularity": 0.4},
        k=3,
        exclude={"a"},
    )
    assert [r.track_id for r in recs] == ["c", "d", "b"]
    assert recs[0].score == pytest.approx(0.5 + 0.4)


def test_caps_tracks_per_artist() -> None:
    ids = ["a1", "a2", "a3", "b1", "c1"]
    artists = {"a1": "A", "a2": "A", "a3": "A", "b1": "B"}  # c1: artist unknown -> uncapped
    scores = {"popularity": np.array([5.0, 4.0, 3.0, 2.0, 1.0])}
    recs = rank_tracks(ids, scores, weights={"popularity": 1.0}, k=5, artist_of=artists,
                       max_per_artist=2)
    assert [r.track_id for r in recs] == ["a1", "a2", "b1", "c1"]
    with pytest.raises(ValueError):
        rank_tracks(ids, scores, max_per_artist=0)


def test_every_item_has_a_reason_naming_its_main_component() -> None:
    recs = rank_tracks(
        ["x", "y", "z"],
        {
            "cooccurrence": np.array([1.0, 0.0, 0.0]),
            "mf": np.array([-1.0, 1.0, -1.0]),
            "popularity": np.array([0.0, 0.0, 1.0]),
        },
        weights={"cooccurrence": 1.0, "mf": 0.9, "popularity": 0.8},
        k=3,
        anchors={"x": "seed-track"},
    )
    reasons = {r.track_id: r.reason for r in recs}
    assert reasons == {
        "x": "because you played seed-track",
        "y": "listeners with similar taste play this",
        "z": "popular right now",
    }


def test_empty_inputs_and_k_zero() -> None:
    assert rank_tracks([], {}, k=10) == []
    assert rank_tracks(["a"], {"popularity": np.array([1.0])}, k=0) == []


def _feed(rec: Recommender, plays: list[tuple[str, str, str | None]]) -> dict[str, UserState]:
    states: dict[str, UserState] = {}
    for i, (user, track, artist) in enumerate(plays):
        ev = PlayEvent(user, track, T0 + i * 1000, 200_000, f"e{i}", artist_id=artist)
        up = update_session(states.get(user), ev)
        rec.learn_one(up, ev)
        states[user] = up.state
    return states


def test_recommender_filters_recent_plays_and_explains() -> None:
    rec = Recommender(weights={"mf": 0.0}, seed=1)  # co-occurrence decides: exact expectations
    plays = [(f"u{u}", t, None) for u in range(6) for t in ("a", "b", "c", "d")]
    states = _feed(rec, plays + [("new", "a", None)])
    recs = rec.recommend(states["new"], k=3, now_ms=T0 + 10**6)
    ids = [r.track_id for r in recs]
    assert "a" not in ids and ids[0] == "b"
    assert recs[0].reason == "because you played a"
    assert all(r.reason for r in recs)
    # the caller's exclusion set is honoured too
    assert "b" not in [r.track_id for r in rec.recommend(states["new"], 3, T0, exclude={"b"})]


def test_recommender_caps_artists_and_handles_cold_start() -> None:
    rec = Recommender(max_per_artist=1, seed=1)
    plays = [(f"u{u}", f"t{i}", "same-artist" if i < 4 else f"art{i}")
             for u in range(4) for i in range(8)]
    _feed(rec, plays)
    cold = rec.recommend(UserState(user_id="stranger"), k=5, now_ms=T0)
    artists = [rec.artist_of.get(r.track_id) for r in cold]
    assert len(cold) == 5 and artists.count("same-artist") <= 1
    assert all(r.reason == "popular right now" for r in cold)
    assert Recommender().recommend(UserState(user_id="x"), k=5, now_ms=T0) == []


@pytest.mark.parametrize("variant", ["popularity", "mf", "cooccurrence", "blend"])
def test_every_variant_ranks_without_repeats(variant: str) -> None:
    rec = Recommender(seed=2)
    states = _feed(rec, [(f"u{u % 3}", f"t{(u * 7) % 41}", None) for u in range(90)])
    recs = rec.recommend(states["u1"], k=5, now_ms=T0, variant=variant)
    ids = [r.track_id for r in recs]
    assert len(ids) == len(set(ids)) and 0 < len(ids) <= 5
    with pytest.raises(ValueError):
        rec.recommend(states["u1"], k=5, now_ms=T0, variant="nope")


def test_similar_tracks_and_snapshot_round_trip() -> None:
    rec = Recommender(seed=3)
    states = _feed(rec, [(f"u{u}", t, None) for u in range(5) for t in ("a", "b", "c")])
    similar = rec.similar("a", 2)
    assert {r.track_id for r in similar} == {"b", "c"}
    assert all(r.reason in ("often played with a", "liked by listeners of a") for r in similar)
    assert rec.similar("never-seen", 5) == []
    twin = Recommender.restore(rec.snapshot())
    assert twin.recommend(states["u1"], 3, T0) == rec.recommend(states["u1"], 3, T0)
    assert twin.similar("a", 2) == similar
    with pytest.raises(SnapshotError):
        Recommender.restore(b"garbage")
    # a format-1 snapshot (a pickle after the magic) is refused without being unpickled
    old = b"STREAMREC\x02\x80\x05garbage"
    with pytest.raises(SnapshotError, match="bad magic"):
        Recommender.restore(old)


def test_listener_factors_round_trip_as_one_matrix() -> None:
    import numpy as np

    rec = Recommender(seed=4)
    states = _feed(rec, [(f"u{u}", f"t{(u * 3 + i) % 9}", None)
                         for u in range(6) for i in range(5)])
    _, arrays = rec.export_state()
    assert arrays["mf.user_factors"].shape == (6, rec.n_factors)
    twin = Recommender.restore(rec.snapshot())
    assert list(twin.mf.user_factors) == list(rec.mf.user_factors)
    for user, vec in rec.mf.user_factors.items():
        restored = twin.mf.user_factors[user]
        assert restored.dtype == np.float32 and np.array_equal(restored, vec)
        assert restored.base is None  # its own array: learning updates it in place
    assert twin.recommend(states["u2"], 4, T0) == rec.recommend(states["u2"], 4, T0)


def test_forget_user_drops_their_factors() -> None:
    rec = Recommender(seed=3)
    _feed(rec, [("u", "a", None), ("u", "b", None)])
    assert rec.forget_user("u") is True
    assert rec.forget_user("u") is False
    assert rec.catalogue_size() == 2
