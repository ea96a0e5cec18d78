"""The session models (STAN / SKNN, sequential rules), the learned blend, and the
Recommender variants built on them: behaviour, bounds, and state export -> import."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from stream.events import PlayEvent
from stream.models.base import Interaction
from stream.models.blend import FEATURES, N_FEATURES, LearnedBlend
from stream.models.rules import SequentialRules
from stream.models.stan import SessionKNN
from stream.recommender import VARIANTS, Recommender, SeenTracks
from stream.session import UserState, update_session


def sessions(n_users: int = 6, n: int = 400) -> list[Interaction]:
    """Listeners who play short sessions over a small catalogue, in time order."""
    out: list[Interaction] = []
    history: dict[str, list[str]] = {}
    position: dict[str, int] = {}
    for i in range(n):
        user = f"u{i % n_users}"
        pos = position.get(user, 0)
        track = f"t{(i * 7 + pos * 3) % 29}"
        out.append(Interaction(user, track, 1_700_000_000_000 + i * 60_000,
                               history=tuple(history.get(user, [])[-10:]),
                               session_position=pos))
        history.setdefault(user, []).append(track)
        position[user] = (pos + 1) % 5
    return out


def json_round_trip(manifest: dict[str, Any]) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(json.dumps(manifest))
    return loaded


def test_stan_weights_follow_the_formula() -> None:
    m = SessionKNN(k=5, lambda_position=1.0, lambda_recency_ms=1000.0, lambda_distance=1.0)
    for i, t in enumerate(["a", "b", "c", "d"]):
        m.learn_one(Interaction("u", t, 1000 + i, session_position=i))
    rows, scores = m.score(["x", "b"], "v", now_ms=1003 + 500)
    got = {m._vocab.ids[r]: s for r, s in zip(rows.tolist(), scores.tolist(), strict=True)}
    # query (x unknown, b): one known track, w1 = 1; neighbour [a, b, c, d] matched at b
    sim = 1.0 / np.sqrt(1 * 4) * np.exp(-500 / 1000)
    assert got == pytest.approx({"a": sim * np.exp(-1), "c": sim * np.exp(-1),
                                 "d": sim * np.exp(-2)})
    # plain SKNN: no weights
    rows, scores = m.score(["b"], "v", now_ms=10**9, plain=True)
    assert scores.tolist() == pytest.approx([0.5, 0.5, 0.5])


def test_stan_memory_is_bounded_by_sessions_and_sample() -> None:
    m = SessionKNN(k=10, sample=4, max_sessions=8, session_length=3)
    for i in range(2000):
        m.learn_one(Interaction(f"u{i % 3}", f"t{i % 13}", i, session_position=i % 7))
    assert int(m._p_size.max()) <= 4 and int(m._p_cap.max()) <= 4
    assert int(m._lengths.max()) <= 3
    assert len(m._open) <= 8
    assert len(m._arena) <= 2 * 2 * 4 * 13 + 2 * 2 * 4 + 1024
    recs = m.candidates(Interaction("u1", history=("t1", "t2")), 5)
    assert recs and all(isinstance(v, float) for v in recs.values())


def test_sr_rules_point_forward_within_a_session_only() -> None:
    m = SequentialRules(steps=3)
    m.learn_one(Interaction("u", "a", 0, session_position=0))
    m.learn_one(Interaction("u", "b", 1, history=("a",), session_position=1))
    m.learn_one(Interaction("u", "c", 2, history=("a", "b"), session_position=0))  # new session
    assert m.candidates(Interaction("v", history=("a",)), 5) == {"b": 1.0}
    assert m.candidates(Interaction("v", history=("b",)), 5) == {}


@pytest.mark.parametrize("cls", [SessionKNN, SequentialRules])
def test_export_import_gives_identical_predictions(cls: type) -> None:
    model = cls(seed=3)
    stream = sessions()
    for x in stream[:300]:
        model.learn_one(x)
    manifest, arrays = model.export_state()
    assert all(isinstance(a, np.ndarray) and a.dtype != object for a in arrays.values())
    twin = cls.import_state(json_round_trip(manifest), {k: a.copy() for k, a in arrays.items()})
    probe = Interaction("u1", history=("t3", "t10"), ts_ms=stream[299].ts_ms)
    assert twin.candidates(probe, 10) == model.candidates(probe, 10)
    for x in stream[300:]:  # and they keep learning alike
        model.learn_one(x)
        twin.learn_one(x)
    assert twin.candidates(probe, 10) == model.candidates(probe, 10)


@pytest.mark.parametrize("cls", [SessionKNN, SequentialRules])
def test_import_rejects_bad_state_naming_the_field(cls: type) -> None:
    model = cls()
    for x in sessions()[:100]:
        model.learn_one(x)
    manifest, arrays = model.export_state()
    name = "items" if cls is SessionKNN else "nbr"
    bad = dict(arrays)
    bad[name] = arrays[name].astype(np.float64)
    with pytest.raises(ValueError, match=name):
        cls.import_state(manifest, bad)
    with pytest.raises(ValueError, match="kind"):
        cls.import_state({**manifest, "kind": "Other"}, arrays)
    missing = {k: v for k, v in arrays.items() if k != name}
    with pytest.raises(ValueError, match=name):
        cls.import_state(manifest, missing)


def test_learned_blend_learns_the_useful_feature_and_round_trips() -> None:
    rng = np.random.default_rng(0)
    blend = LearnedBlend(seed=5, prior_init=0.0, learning_rate=0.05)
    col = FEATURES.index("s_sr")
    for i in range(300):
        X = rng.random((20, N_FEATURES))
        positive = int(np.argmax(X[:, col]))
        blend.learn(X, positive, key=i)
    w = blend.weights
    assert w[col] == max(w) and w[col] > 0
    twin = LearnedBlend.import_state(json_round_trip(blend.export_state()[0]), {})
    X = rng.random((30, N_FEATURES))
    assert twin.score(X).tolist() == blend.score(X).tolist()
    twin.learn(X, 3, key=99)
    blend.learn(X, 3, key=99)
    assert twin.weights.tolist() == blend.weights.tolist()
    manifest = blend.export_state()[0]
    with pytest.raises(ValueError, match="weights.s_sr"):
        LearnedBlend.import_state({**manifest, "weights": {"s_sr": float("nan")}}, {})


def test_learned_blend_is_deterministic_under_a_seed() -> None:
    rng = np.random.default_rng(1)
    lists = [(rng.random((15, N_FEATURES)), int(rng.integers(15))) for _ in range(100)]
    a, b, c = LearnedBlend(seed=2), LearnedBlend(seed=2), LearnedBlend(seed=3)
    for i, (X, pos) in enumerate(lists):
        a.learn(X, pos, key=i)
        b.learn(X, pos, key=i)
        c.learn(X, pos, key=i)
    assert a.weights.tolist() == b.weights.tolist()
    assert a.weights.tolist() != c.weights.tolist()


def replay_events(n: int = 600) -> list[PlayEvent]:
    out = []
    for i in range(n):
        user = f"u{i % 9}"
        track = f"t{(i * 11 + (i // 9) * 5) % 41}"
        out.append(PlayEvent(user, track, 1_700_000_000_000 + i * 30_000, 200_000, f"e{i}",
                             artist_id=f"a{hash(track) % 1}", session_id=f"{user}-{i // 90}"))
    return out


def run_recommender(rec: Recommender, events: list[PlayEvent]) -> dict[str, UserState]:
    states: dict[str, UserState] = {}
    for event in events:
        update = update_session(states.get(event.user_id), event)
        rec.recommend(update.before, 10, event.ts_ms)  # so the blend learns from its list
        rec.learn_one(update, event)
        states[event.user_id] = update.state
    return states


def test_every_variant_ranks_and_the_blend_learns() -> None:
    rec = Recommender(seed=1)
    states = run_recommender(rec, replay_events())
    assert rec.ranker.n_learned > 50
    seen = SeenTracks(rec.vocabulary)
    for state in states.values():
        for variant in VARIANTS:
            recs = rec.recommend(state, 10, 1_700_100_000_000, variant=variant, exclude=seen)
            assert 0 < len(recs) <= 10
            ids = [r.track_id for r in recs]
            assert len(set(ids)) == len(ids)
            assert not set(ids) & set(state.recent)
    # the worker's batch path ranks with the learned blend too
    many = rec.recommend_many(list(states.values()), 10, 1_700_100_000_000)
    one = [rec.recommend(s, 10, 1_700_100_000_000) for s in states.values()]
    assert many == one


def test_recommender_is_deterministic_and_eviction_keeps_it_working() -> None:
    a, b = Recommender(seed=4), Recommender(seed=4)
    sa, sb = run_recommender(a, replay_events()), run_recommender(b, replay_events())
    assert a.ranker.weights.tolist() == b.ranker.weights.tolist()
    user = next(iter(sa))
    assert a.recommend(sa[user], 10, 1_700_100_000_000) == b.recommend(sb[user], 10,
                                                                        1_700_100_000_000)
    a.evict_tracks(20)
    for variant in VARIANTS:
        recs = a.recommend(sa[user], 10, 1_700_100_000_000, variant=variant)
        assert all(r.track_id in a.vocabulary.index for r in recs)
