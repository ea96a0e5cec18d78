"""The session models (STAN / SKNN, sequential rules), the learned blend, and the
Recommender variants built on them: behaviour, bounds, and state export -> import."""

from __future__ import annotations

import inspect
import json
import math
from typing import Any

import numpy as np
import pytest

from stream.core.events import PlayEvent
from stream.core.models.base import Interaction
from stream.core.models.blend import (
    FEATURES,
    LOSSES,
    MAX_ROW_VALUE,
    MAX_WEIGHT,
    N_FEATURES,
    OLD_CHECKPOINT_DEFAULTS,
    LearnedBlend,
)
from stream.core.models.rules import SequentialRules
from stream.core.models.stan import SessionKNN
from stream.core.recommender import VARIANTS, Recommender, SeenTracks
from stream.core.session import UserState, update_session


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
    with pytest.raises(ValueError, match="unknown parameter"):
        cls.import_state({**manifest, "params": {**manifest["params"], "other": 1}}, arrays)
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


def test_learned_blend_matches_river() -> None:
    """The numpy SGD step is river's LogisticRegression(SGD(lr), l2, no intercept) on the
    pair differences, label True (the model the blend used before). The differences are
    rounded to float32 first: that row is the step other workers receive (issue 17)."""
    from river import linear_model, optim, utils

    from stream.core.models.blend import _mix

    rng = np.random.default_rng(4)
    blend = LearnedBlend(seed=7, learning_rate=0.05, l2=1e-3, loss="pairwise", lr_decay=0.0)
    ref = linear_model.LogisticRegression(optimizer=optim.SGD(0.05), l2=1e-3,
                                          intercept_lr=0.0)
    ref._weights = utils.VectorDict({"prior": 1.0})
    for i in range(200):
        X = rng.normal(size=(12, N_FEATURES)) * 3
        pos = int(rng.integers(12))
        before = blend.weights
        chosen = blend.learn(X, pos, key=i)
        assert chosen >= 1
        # the same pairs through river: drawn exactly as learn() draws them
        order = np.argsort(-(X @ before + 1e-3 * X[:, 0]), kind="stable")
        pool = [int(j) for j in order if j != pos]
        h = _mix(blend.seed * 0x100000001B3 ^ i)
        picks: list[int] = []
        for j in range(min(blend.negatives, len(pool))):
            h = _mix(h + j)
            if pool[h % len(pool)] not in picks:
                picks.append(pool[h % len(pool)])
        for neg in picks:
            row = (X[pos] - X[neg]).astype(np.float32).astype(np.float64)
            ref.learn_one(dict(zip(FEATURES, row.tolist(), strict=True)), True)
        mirror = np.array([ref._weights.get(f, 0.0) for f in FEATURES])
        # numpy's and river's dot products sum in other orders: with 40 features the
        # weights drift apart by up to ~1e-10 (5e-9 relative) over the 200 steps; a wrong
        # step is off by ~1e-3
        np.testing.assert_allclose(blend.weights, mirror, rtol=1e-7, atol=1e-9)


def test_learned_blend_softmax_step() -> None:
    """The softmax (ListNet) step: one row per list, ``x_pos - softmax(X @ w) @ X`` as
    float32, applied as ``w += lr_t * (row - l2 * w)`` with ``lr_t = lr / sqrt(1 + t /
    lr_decay)``; a restored blend (and a worker given the rows) takes the same steps."""
    rng = np.random.default_rng(8)
    blend = LearnedBlend(seed=1, learning_rate=0.1, l2=1e-4, lr_decay=50.0)
    w = blend.weights
    for i in range(120):
        X = rng.normal(size=(9, N_FEATURES))
        pos = int(rng.integers(9))
        z = X @ w
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        row = (X[pos] - p @ X).astype(np.float32)
        rows = blend.pairs(X, pos, key=i)
        np.testing.assert_allclose(rows, row[None], rtol=1e-5, atol=1e-6)
        lr = 0.1 / np.sqrt(1.0 + i / 50.0)
        w = w + lr * (rows[0].astype(np.float64) - 1e-4 * w)
        assert blend.apply_pairs(rows) == 1
        np.testing.assert_allclose(blend.weights, w, rtol=1e-12, atol=1e-15)
    assert blend.iterations == blend.n_learned == 120
    twin = LearnedBlend.import_state(json_round_trip(blend.export_state()[0]), {})
    X = rng.normal(size=(9, N_FEATURES))
    assert twin.step_size() == blend.step_size() == 0.1 / np.sqrt(1.0 + 120 / 50.0)
    assert twin.learn(X, 2, key=5) == blend.learn(X, 2, key=5) == 1
    assert twin.weights.tolist() == blend.weights.tolist()
    with pytest.raises(ValueError, match="loss"):
        LearnedBlend(loss="listwise")
    with pytest.raises(ValueError, match="lr_decay"):
        LearnedBlend(lr_decay=-1.0)


def test_a_blend_checkpoint_from_before_session_16_learns_with_the_softmax_step() -> None:
    """Checkpoints written before the softmax step have no ``loss`` / ``lr_decay`` and
    no weights for the newer features: they restore their weights (the newer features at
    0) and their step count, and from then on learn with today's defaults (softmax, the
    default rates), which they also export; an explicit ``loss`` is kept."""
    old = LearnedBlend(seed=3, learning_rate=0.01, loss="pairwise", lr_decay=0.0)
    rng = np.random.default_rng(4)
    for i in range(20):
        old.learn(rng.random((12, N_FEATURES)), int(rng.integers(12)), key=i)
    manifest = json_round_trip(old.export_state()[0])
    del manifest["params"]["loss"], manifest["params"]["lr_decay"]
    manifest["weights"] = {f: w for f, w in manifest["weights"].items()
                           if f not in FEATURES[31:]}
    twin = LearnedBlend.import_state(manifest, {})
    fresh = LearnedBlend()
    assert (twin.loss, twin.learning_rate, twin.lr_decay) == (
        fresh.loss, fresh.learning_rate, fresh.lr_decay) == ("softmax", 0.05, 3000.0)
    t = old.iterations
    assert twin.iterations == t > 20  # t kept: the rate goes on decaying from there
    assert twin.step_size() == pytest.approx(0.05 / math.sqrt(1 + t / 3000))
    assert twin.weights[:31].tolist() == old.weights[:31].tolist()
    assert not twin.weights[31:].any()
    X = rng.random((12, N_FEATURES))
    expected = twin.weights + twin.step_size() * (
        twin.pairs(X, 2, key=0)[0].astype(np.float64) - twin.l2 * twin.weights)
    assert twin.learn(X, 2, key=0) == 1  # one softmax row, not `negatives` pairs
    assert twin.weights == pytest.approx(expected)
    assert twin.weights[31:].any()
    assert twin.export_state()[0]["params"]["loss"] == "softmax"
    kept = LearnedBlend.import_state({**manifest, "params": {
        **manifest["params"], "loss": "pairwise", "lr_decay": 0.0}}, {})
    assert (kept.loss, kept.learning_rate, kept.lr_decay) == ("pairwise", 0.01, 0.0)
    with pytest.raises(ValueError, match="loss"):
        LearnedBlend.import_state({**manifest, "params": {**manifest["params"],
                                                          "loss": "other"}}, {})


def test_a_session_16_blend_checkpoint_restores_without_recent_artist() -> None:
    """A checkpoint of session 16 (39 features, softmax) has no ``recent_artist`` weight:
    it restores its weights and step count with ``recent_artist`` at 0, so it ranks every
    list as before, and learns the new weight from its next step."""
    old = LearnedBlend(seed=3)
    rng = np.random.default_rng(6)
    for i in range(20):
        old.learn(rng.random((12, N_FEATURES)), int(rng.integers(12)), key=i)
    manifest = json_round_trip(old.export_state()[0])
    assert FEATURES.index("recent_artist") == 39
    manifest["weights"] = {f: w for f, w in manifest["weights"].items() if f != "recent_artist"}
    twin = LearnedBlend.import_state(manifest, {})
    assert twin.iterations == old.iterations and twin.loss == "softmax"
    assert twin.weights[:39].tolist() == old.weights[:39].tolist()
    assert twin.weights[39] == 0.0 != old.weights[39]
    X = rng.random((12, N_FEATURES))
    base = X.copy()
    X[:, 39] = rng.random(12)  # the new column does not move an old model's scores
    assert twin.score(X).tolist() == twin.score(base).tolist()
    assert twin.learn(X, 3, key=0) == 1 and twin.weights[39] != 0.0


def test_a_non_finite_or_huge_step_is_never_taken() -> None:
    """One non-finite feature, or weights so large the scores overflow, would turn the
    softmax row (and then the weights) NaN for good: such a list gives no rows, rows that
    are not finite or beyond MAX_ROW_VALUE are refused, a step that would take a weight
    beyond MAX_WEIGHT is not taken, and a checkpoint's weights are bounded."""
    manifest = json_round_trip(LearnedBlend().export_state()[0])
    manifest["weights"]["prior"] = 1.7e308  # finite, but every score overflows
    with pytest.raises(ValueError, match=r"ranker\.weights\.prior"):
        LearnedBlend.import_state(manifest, {})
    manifest["weights"]["prior"] = -MAX_WEIGHT
    assert LearnedBlend.import_state(manifest, {}).weights[0] == -MAX_WEIGHT
    rng = np.random.default_rng(1)
    for loss in LOSSES:
        m = LearnedBlend(loss=loss)
        X = rng.random((30, N_FEATURES))
        X[17, 5] = X[3, 7] = np.inf  # one candidate's feature, and the positive's
        assert m.pairs(X, 3, key=0).shape == (0, N_FEATURES)
        assert m.learn(X, 3, key=0) == 0
        X[3, 7], X[17, 5] = 0.5, 5e3
        assert m.learn(X, 17, key=0) == 0  # a row beyond MAX_ROW_VALUE
        if loss == "softmax":  # as if it got there: the scores overflow
            m._w = np.full(N_FEATURES, 1e307)
            assert m.pairs(rng.random((30, N_FEATURES)), 3, key=0).shape == (0, N_FEATURES)
        m = LearnedBlend(loss=loss)
        for bad in (np.nan, np.inf, 2 * MAX_ROW_VALUE):
            rows = np.ones((1, N_FEATURES), np.float32)
            rows[0, 4] = bad
            with pytest.raises(ValueError, match="not finite or beyond"):
                m.apply_pairs(rows)
        assert (m.iterations, m.n_pairs) == (0, 0)
    m = LearnedBlend(learning_rate=1e9, lr_decay=0.0)
    with pytest.raises(ValueError, match="would exceed"):
        m.apply_pairs(np.full((1, N_FEATURES), 900.0, np.float32))
    assert (m.iterations, m.weights[0]) == (0, 1.0)
    assert np.isfinite(m.weights).all()


def test_the_owner_sends_and_takes_only_usable_blend_rows() -> None:
    """The owner's own rows go through the check a receiver applies: a list with a
    non-finite feature gives no step (nothing learned, nothing sent)."""
    rec = Recommender(seed=0)
    states: dict[str, UserState] = {}
    events = replay_events(200)
    for e in events[:150]:
        up = update_session(states.get(e.user_id), e)
        rec.learn_one(up, e)
        states[e.user_id] = up.state
    twin = Recommender.import_state(*rec.export_state())
    twin_states = {u: st.copy() for u, st in states.items()}
    stepped = 0
    for e in events[150:]:  # unpoisoned, the same plays give blend steps
        up = update_session(twin_states.get(e.user_id), e)
        stepped += twin.learn_one(up, e).step.blend_pairs is not None  # type: ignore[union-attr]
        twin_states[e.user_id] = up.state
    assert stepped >= 10
    real = rec._blend_candidates

    def poisoned(*args: Any) -> Any:
        rows, X, *rest = real(*args)
        X = X.copy()
        X[:, 5] = np.inf
        return (rows, X, *rest)

    rec._blend_candidates = poisoned  # type: ignore[method-assign]
    before, t = rec.ranker.weights, rec.ranker.iterations
    steps = []
    for e in events[150:]:
        up = update_session(states.get(e.user_id), e)
        steps.append(rec.learn_one(up, e).step)
        states[e.user_id] = up.state
    assert all(s is not None and s.blend_pairs is None for s in steps)
    assert rec.ranker.iterations == t and rec.ranker.weights.tolist() == before.tolist()


def test_a_checkpoint_cannot_freeze_the_blend() -> None:
    """A decay below 1 or a step count t above the rows ever applied would make the rate
    ~0 after a few steps: refused in the constructor and on import, naming the field."""
    for bad in (0.5, 1e-9):
        with pytest.raises(ValueError, match="lr_decay"):
            LearnedBlend(lr_decay=bad)
    assert LearnedBlend(lr_decay=1.0).lr_decay == 1.0 and LearnedBlend(lr_decay=0.0)
    m = LearnedBlend(seed=1)
    rng = np.random.default_rng(2)
    for i in range(5):
        m.learn(rng.random((10, N_FEATURES)), i, key=i)
    manifest = json_round_trip(m.export_state()[0])
    assert manifest["optimizer_iterations"] == manifest["n_pairs"] == 5
    assert LearnedBlend.import_state(manifest, {}).step_size() == m.step_size()
    for field, value in (("optimizer_iterations", 6), ("optimizer_iterations", 10**15),
                         ("n_learned", 6)):
        with pytest.raises(ValueError, match=f"ranker.{field}"):
            LearnedBlend.import_state({**manifest, field: value}, {})
    with pytest.raises(ValueError, match="lr_decay"):
        LearnedBlend.import_state({**manifest, "params": {**manifest["params"],
                                                          "lr_decay": 0.001}}, {})


def test_the_defaults_of_an_old_checkpoint_are_the_constructors() -> None:
    defaults = {name: p.default for name, p in
                inspect.signature(LearnedBlend.__init__).parameters.items()}
    assert {k: defaults[k] for k in OLD_CHECKPOINT_DEFAULTS} == OLD_CHECKPOINT_DEFAULTS


def test_learned_blend_is_deterministic_under_a_seed() -> None:
    rng = np.random.default_rng(1)
    lists = [(rng.random((15, N_FEATURES)), int(rng.integers(15))) for _ in range(100)]
    # the softmax step draws nothing; the pairwise one draws negatives by the seed
    for loss, seeded in (("softmax", False), ("pairwise", True)):
        a, b, c = (LearnedBlend(seed=s, loss=loss) for s in (2, 2, 3))
        for i, (X, pos) in enumerate(lists):
            a.learn(X, pos, key=i)
            b.learn(X, pos, key=i)
            c.learn(X, pos, key=i)
        assert a.weights.tolist() == b.weights.tolist()
        assert (a.weights.tolist() != c.weights.tolist()) == seeded


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


def artist_events(n: int = 700) -> list[PlayEvent]:
    """Plays with real artist ids (7 artists) over 50 tracks, 12 listeners."""
    out = []
    for i in range(n):
        user = f"u{i % 12}"
        t = (i * 13 + (i // 12) * 7) % 50
        out.append(PlayEvent(user, f"t{t}", 1_700_000_000_000 + i * 30_000, 200_000, f"e{i}",
                             artist_id=f"a{t % 7}"))
    return out


def test_checkpoint_round_trip_keeps_session_models_and_blend_sources() -> None:
    """session_knn, rules and ranker are checkpoint components; first_seen, tracks_of and
    own_history travel too: the restored recommender ranks and learns exactly alike."""
    from stream.core.checkpoint import pack_state, unpack_state

    rec = Recommender(seed=3, repeats=8, artist_tracks=5)
    states = run_recommender(rec, artist_events())
    assert rec.own_history and rec.tracks_of and rec.ranker.n_learned > 0
    manifest, arrays = unpack_state(pack_state(*rec.export_state()))
    twin = Recommender.import_state(manifest, arrays)
    assert twin.own_history == rec.own_history and twin.tracks_of == rec.tracks_of
    n = len(rec.vocabulary)
    assert twin.first_seen[:n].tolist() == rec.first_seen[:n].tolist()
    assert twin.ranker.weights.tolist() == rec.ranker.weights.tolist()
    assert (twin.repeats, twin.artist_tracks, twin.blend) == (8, 5, "learned")
    now = 1_700_100_000_000
    for state in states.values():
        for variant in VARIANTS:
            assert (twin.recommend(state, 10, now, variant=variant)
                    == rec.recommend(state, 10, now, variant=variant))
    more = artist_events(900)[700:]
    s1 = run_recommender(rec, more)
    s2 = run_recommender(twin, more)
    assert s1 == s2
    assert twin.ranker.weights.tolist() == rec.ranker.weights.tolist()
    for state in s1.values():
        assert twin.recommend(state, 10, now) == rec.recommend(state, 10, now)


@pytest.mark.parametrize("name", ["own_history.counts", "tracks_of.counts", "first_seen",
                                  "session_knn.items", "rules.nbr"])
def test_import_refuses_a_spoiled_blend_source_naming_it(name: str) -> None:
    rec = Recommender(seed=3, repeats=8, artist_tracks=5)
    run_recommender(rec, artist_events(300))
    manifest, arrays = rec.export_state()
    bad = dict(arrays)
    spoiled = arrays[name].copy()
    spoiled.flat[-1] = -5
    bad[name] = spoiled
    with pytest.raises(ValueError, match=name.split(".")[0]):
        Recommender.import_state(manifest, bad)


def test_eviction_renumbers_session_models_and_blend_sources() -> None:
    rec = Recommender(seed=3, repeats=8, artist_tracks=5)
    states = run_recommender(rec, artist_events())
    ids_before = list(rec.vocabulary.ids)
    first_before = {t: int(rec.first_seen[r]) for r, t in enumerate(ids_before)}
    evicted: list[str] = []
    rec.evict_tracks(30, evicted.extend)
    assert len(evicted) == 20 and len(rec.vocabulary) == 30
    gone = set(evicted)
    # every track row the session models hold is a live row, and means the same track
    knn = rec.session_knn
    live = np.arange(knn.session_length)[None, :] < knn._lengths[:, None]
    assert int(knn._items[live].max()) < 30
    # rows from 30 on are empty rings (kept as capacity, not truncated and grown again)
    assert len(knn._p_start) >= 30 and not knn._p_cap[30:].any() and not knn._p_size[30:].any()
    assert all(not gone & set(v) for v in rec.tracks_of.values())
    assert all(rec.artist_of.get(t) == a for a, v in rec.tracks_of.items() for t in v)
    for r, t in enumerate(rec.vocabulary.ids):
        assert int(rec.first_seen[r]) == first_before[t]
    # a freshly restored copy of the evicted recommender ranks alike (state consistent)
    twin = Recommender.import_state(*rec.export_state())
    now = 1_700_100_000_000
    for state in states.values():
        for variant in ("sknn", "stan", "sr", "blend"):
            recs = rec.recommend(state, 10, now, variant=variant)
            assert recs == twin.recommend(state, 10, now, variant=variant)
            assert not {r.track_id for r in recs} & gone


def test_per_listener_state_is_listed_forgotten_and_bounded() -> None:
    rec = Recommender(seed=3, repeats=4, max_users=5)
    run_recommender(rec, artist_events(240))
    assert len(rec.own_history) == 5  # the 5 most recently played of 12 listeners
    assert list(rec.own_history) == [f"u{i % 12}" for i in range(235, 240)]
    users = set(rec.user_ids())
    assert set(rec.own_history) <= users
    # session-kNN links open sessions by an opaque token, never by listener id
    assert rec.session_knn.open_users() and not set(rec.session_knn.open_users()) & users
    victim = next(iter(rec.own_history))
    assert rec.forget_user(victim)
    assert victim not in rec.user_ids() and victim not in rec.own_history
    rec.limit_users(2)
    assert len(rec.own_history) == 2


def test_learned_blend_reason_codes_map_to_named_reasons() -> None:
    """The learned blend's own sources have reason keys: the artist source names the
    recent play by that artist (so the catalogue can say "more by the artist of X by Y"),
    own history is "you played this before"; every code the blend emits is a key of
    REASON_TEXTS."""
    from stream.core.ranking import REASON_TEXTS
    from stream.core.recommender import REASON_ARTIST, REASON_OWN

    rec = Recommender(seed=3, artist_tracks=20, max_per_artist=None, repeats=5)
    states = run_recommender(rec, artist_events())
    for state in states.values():
        for r in rec.recommend(state, 50, 1_700_100_000_000):
            assert r.code in REASON_TEXTS
            if r.code == "played":
                assert r.anchor is not None and r.reason == f"because you played {r.anchor}"
    rows = np.array([0, 1, 2], dtype=np.int64)
    codes = np.array([REASON_ARTIST, REASON_OWN, REASON_ARTIST], dtype=np.int64)
    leads = np.array([5, -1, -1], dtype=np.int64)
    out = rec._results(rows, np.array([3.0, 2.0, 1.0]), codes, leads, 3)
    ids = rec.vocabulary.ids
    assert [(r.code, r.anchor) for r in out] == [
        ("same_artist", ids[5]), ("played_before", None), ("trending", None)]
    assert out[0].reason == f"more by the artist of {ids[5]}"
    assert out[1].reason == "you played this before"
    # in a ranked list: tracks only the artist source reaches (one-play listeners, so no
    # co-occurrence or shared session) name the listener's play by that artist
    t = 1_700_200_000_000
    solo = [PlayEvent(u, tr, t + i, 200_000, f"s{i}", artist_id="z")
            for i, (u, tr) in enumerate((("p", "solo2"), ("q", "solo3"), ("r", "solo1")))]
    states = {**states, **run_recommender(rec, solo)}
    recs = rec.recommend(states["r"], 50, t + 10)
    by_artist = {r.track_id: r for r in recs if r.code == "same_artist"}
    assert set(by_artist) == {"solo2", "solo3"}
    assert all(r.anchor == "solo1" and r.reason == "more by the artist of solo1"
               for r in by_artist.values())
    # and the catalogue names the anchor in the published text
    from stream.core.catalog import TrackCatalog

    cat = TrackCatalog()
    cat.observe("solo1", "Karma Police", "Radiohead", None, ts_ms=1)
    item = cat.items([by_artist["solo2"]])[0]
    assert item["reason"] == "more by the artist of Karma Police by Radiohead"
    assert (item["reason_code"], item["reason_track_id"]) == ("same_artist", "solo1")


def test_fixed_ranker_learns_no_session_models_and_the_setting_is_validated() -> None:
    from stream.config import load_settings
    from stream.errors import ConfigError

    assert load_settings(env={}, file=None).ranker == "fixed"
    assert load_settings(env={"STREAM_RANKER": "learned"}, file=None).ranker == "learned"
    with pytest.raises(ConfigError, match="STREAM_RANKER"):
        load_settings(env={"STREAM_RANKER": "smart"}, file=None)
    with pytest.raises(ValueError, match="session_models"):
        Recommender(blend="learned", session_models=False)
    fixed = Recommender(seed=2, blend="fixed", session_models=False, repeats=3)
    states = run_recommender(fixed, artist_events(300))
    assert fixed.session_knn.memory_bytes() == SessionKNN().memory_bytes()
    assert not fixed.own_history and not fixed.tracks_of and fixed.ranker.n_learned == 0
    assert len(fixed.rules.arena()[4]) == 0 or int(fixed.rules._size.sum()) == 0
    # the same plays, the fixed blend's lists: identical to a recommender with everything on
    full = Recommender(seed=2, blend="fixed", repeats=3)
    run_recommender(full, artist_events(300))
    now = 1_700_100_000_000
    for state in states.values():
        assert fixed.recommend(state, 10, now) == full.recommend(state, 10, now)
    fixed.use_ranker("learned")
    assert fixed.session_models and fixed.blend == "learned"
    run_recommender(fixed, artist_events(400)[300:])
    assert fixed.ranker.n_learned > 0 and fixed.own_history


def test_stan_query_window_is_capped_naming_the_field() -> None:
    """The position table is up to ``query_window ** 2`` floats: a huge window (from a
    setting or a checkpoint) is refused, at construction and at import."""
    from stream.core.models.stan import MAX_QUERY_WINDOW

    SessionKNN(query_window=MAX_QUERY_WINDOW)
    with pytest.raises(ValueError, match="query_window"):
        SessionKNN(query_window=MAX_QUERY_WINDOW + 1)
    model = SessionKNN()
    for x in sessions()[:100]:
        model.learn_one(x)
    manifest, arrays = model.export_state()
    bad = {**manifest, "params": {**manifest["params"], "query_window": 20_000}}
    with pytest.raises(ValueError, match="query_window"):
        SessionKNN.import_state(json_round_trip(bad), arrays)
    with pytest.raises(ValueError, match="query_window"):
        Recommender(stan_params={"query_window": 3000})


def test_stan_position_table_grows_with_the_longest_query_only() -> None:
    """Row ``l - 1`` of the table is :meth:`score`'s weights of an ``l``-track query; the
    table is built for the queries asked for (doubling), not for ``query_window``."""
    m = SessionKNN(query_window=1000, lambda_position=3.0)
    table = m.position_table(5)
    assert table.shape == (5, 5)
    assert m.position_table(3) is table  # long enough: reused
    grown = m.position_table(7)
    assert grown.shape == (10, 10)
    assert m.position_table(400).shape == (400, 400)
    assert m.position_table(2000).shape == (1000, 1000)  # never past query_window
    small = SessionKNN(query_window=4, lambda_position=None)
    assert small.position_table(30).shape == (4, 4)
    assert small.position_table().shape == (4, 4)
    for nq in range(1, 11):
        np.testing.assert_array_equal(grown[nq - 1, :nq], np.exp((np.arange(1, nq + 1) - nq) / 3.0))
        assert not grown[nq - 1, nq:].any()
    # a recommender with a long window keeps the table of its listeners' recent plays
    rec = Recommender(seed=1, stan_params={"query_window": 1000})
    run_recommender(rec, replay_events(300))
    (table,) = rec.session_knn.__dict__["_q_table"].values()
    assert 1 < len(table) <= 2 * 30  # max_recent = 30 plays; 1000 x 1000 would be 8 MB


def test_stan_source_refuses_a_position_table_shorter_than_the_query() -> None:
    """The compiled STAN query reads ``q_table[l - 1, :l]`` unchecked by numba: a table
    built for shorter queries raises instead of reading past its end."""
    from stream.core.models import _blend_kernels as _bk

    m = SessionKNN(query_window=10)
    for x in sessions()[:200]:
        m.learn_one(x)
    recent = np.array([m._vocab.index[f"t{i}"] for i in (1, 2, 3, 4, 5, 6)], dtype=np.int64)
    now = 1_700_000_000_000 + 400 * 60_000
    rows, vals = _bk.stan_source(recent, 6, 10, *m.query_inputs("zz", now, 6))
    want_rows, want_vals = m.score([f"t{i}" for i in (1, 2, 3, 4, 5, 6)], "zz", now)
    assert rows.tolist() == want_rows.tolist() and vals.tolist() == want_vals.tolist()
    short = SessionKNN.import_state(*m.export_state())
    with pytest.raises(ValueError, match="position table"):
        _bk.stan_source(recent, 6, 10, *short.query_inputs("zz", now, 3))
    assert not short._scratch["acc"].any() and (short._scratch["qmark"] == -1).all()


@pytest.mark.parametrize("l2", [0.0, 1e-3])
def test_skip_model_matches_river(l2: float) -> None:
    """The skip model's logistic regression is river's LogisticRegression(SGD(lr), l2) to
    the last bit: the same predictions, weights (in the same order: the checkpoint's),
    intercept and step count, with contexts first seen late and replicated feature dicts;
    and the loss gradient and sigmoid on their clipped branches (|logit| > 18 and 30)."""
    from river import linear_model, optim, utils

    from stream.core.models.skip import SkipClassifier, _log_gradient, _sigmoid

    for z in (-45.0, -31.0, -29.5, -18.5, -17.0, -0.3, 0.0, 0.7, 17.9, 18.2, 30.5, 44.0):
        assert _sigmoid(z) == utils.math.sigmoid(z)
        for y in (True, False):
            assert _log_gradient(y, z) == optim.losses.Log().gradient(y_true=y, y_pred=z)

    rng = np.random.default_rng(11)
    model = SkipClassifier(learning_rate=0.05, l2=l2)
    ref = linear_model.LogisticRegression(optimizer=optim.SGD(0.05), l2=l2)
    contexts = [None, None, "radio", "playlist", "search"]
    for i in range(1500):
        x = Interaction("u", "t", int(rng.integers(1 << 40)), skipped=bool(rng.random() < 0.3),
                        session_position=int(rng.integers(50)),
                        recent_skip_rate=float(rng.random()),
                        context=contexts[min(i // 200, 4) if rng.random() < 0.7 else 0],
                        features={"popularity": float(rng.random() * 0.01),
                                  "mf": float(rng.normal() * (40 if i % 97 == 0 else 1))})
        feats = model.features(x)
        want = float(ref.predict_proba_one(feats).get(True, 0.0))
        if i % 3:
            got = model.predict_learn_features(feats, x.skipped)
        else:
            got = model.predict_one(x)
            model.learn_features(feats, x.skipped)
        ref.learn_one(dict(feats), x.skipped)
        assert got == want
        assert list(model.classifier.weights.items()) == list(ref.weights.items())
        assert model.classifier.intercept == ref.intercept
    assert model.classifier.n_iterations == ref.optimizer.n_iterations == 1500
    assert any(k.startswith("context=") for k in model.classifier.weights)


def test_compiled_softmax_step_is_numpys_to_float32() -> None:
    """``learn_played`` (one compiled call) = ``pairs`` then ``apply_pairs`` = numpy's
    softmax row (to float32: the sums run in another order) and numpy's step on it (to
    the bit); not a candidate, a non-finite feature or a weight beyond MAX_WEIGHT learns
    nothing."""
    from stream.core.models.blend import MAX_WEIGHT

    rng = np.random.default_rng(5)
    a, b = LearnedBlend(seed=1, l2=1e-4), LearnedBlend(seed=1, l2=1e-4)
    close = 0
    for i in range(300):
        n = int(rng.integers(2, 140))
        X = rng.random((n, N_FEATURES)) * rng.choice([0.1, 1.0, 5.0])
        rows = rng.permutation(1000)[:n].astype(np.int64)
        pos = int(rng.integers(n))
        w0, lr = a.weights, a.step_size()
        z = X @ w0
        p = np.exp(z - z.max())
        p /= p.sum()
        want = (X[pos] - p @ X).astype(np.float32)
        got = a.learn_played(rows, int(rows[pos]), X)
        assert got is not None and got.shape == (1, N_FEATURES)
        close += int((got[0] == want).all())
        np.testing.assert_allclose(got[0], want, rtol=1e-6, atol=1e-12)
        d = got[0].astype(np.float64)
        assert (a.weights == w0 + lr * (d - 1e-4 * w0)).all()
        assert (b.pairs(X, pos, key=i) == got).all()
        assert b.apply_pairs(got) == 1 and (b.weights == a.weights).all()
    assert close >= 290 and a.iterations == a.n_pairs == a.n_learned == 300
    X = rng.random((5, N_FEATURES))
    assert a.learn_played(np.arange(5), 7, X) is None  # not a candidate
    X[2, 3] = np.nan
    assert a.learn_played(np.arange(5), 1, X) is None and a.iterations == 300
    big = LearnedBlend(seed=1, learning_rate=1.0, lr_decay=0.0, l2=0.0)
    big._w[:2] = MAX_WEIGHT - 1
    X = np.zeros((3, N_FEATURES))
    X[0, 1], X[1:, 0] = 10.0, 900.0  # the others take the softmax: row[1] = 10
    before = big.weights
    assert big.learn_played(np.arange(3), 0, X) is None and big.iterations == 0
    assert (big.weights == before).all()
    with pytest.raises(ValueError, match="exceed"):
        big.apply_pairs(big.pairs(X, 0, key=0))


def test_learn_played_refuses_candidate_rows_that_do_not_match_x() -> None:
    """``softmax_learn`` does not bounds-check (numba): candidate ``rows`` longer than the
    feature rows ``X`` let a played row past X's end read past the array and take a step
    from whatever lies there. ``learn_played`` must refuse the mismatch (ValueError)
    before the kernel runs, and learn nothing (review17a)."""
    blend = LearnedBlend(seed=1)
    X = np.random.default_rng(0).random((2, N_FEATURES))
    w0 = blend.weights
    for played in (1, 40, 499):
        with pytest.raises(ValueError):
            blend.learn_played(np.arange(500, dtype=np.int64), played, X)
    np.testing.assert_array_equal(blend.weights, w0)
    assert blend.n_learned == blend.iterations == 0
