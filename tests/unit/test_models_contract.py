"""One contract, every model: learns, predicts on unseen ids, is deterministic under a seed,
and does not grow when asked about ids it has never seen."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from stream.core.checkpoint import pack_state, unpack_state
from stream.core.models import (
    DecayedPopularity,
    ImplicitMF,
    Interaction,
    OnlineModel,
    SessionCooccurrence,
    SkipClassifier,
    SkipRateDrift,
    clone,
    get_params,
)
from stream.core.models.rules import SequentialRules
from stream.core.models.stan import SessionKNN

MODELS: dict[str, Callable[[int], Any]] = {
    "popularity": lambda seed: DecayedPopularity(seed=seed),
    "cooccurrence": lambda seed: SessionCooccurrence(seed=seed),
    "mf": lambda seed: ImplicitMF(n_factors=8, seed=seed),
    "skip": lambda seed: SkipClassifier(seed=seed),
    "drift": lambda seed: SkipRateDrift(seed=seed),
    "stan": lambda seed: SessionKNN(k=20, sample=8, max_sessions=16, seed=seed),
    "sknn": lambda seed: SessionKNN(k=20, lambda_position=None, lambda_recency_ms=None,
                                    lambda_distance=None, seed=seed),
    "sr": lambda seed: SequentialRules(steps=4, seed=seed),
}

BAD_ARGS: dict[str, list[dict[str, Any]]] = {
    "popularity": [{"half_life_ms": 0}, {"skip_weight": 2.0}],
    "cooccurrence": [{"window": 0}, {"decay": 0.0}, {"max_neighbours": 0}, {"backward": -1}],
    "mf": [{"n_factors": 0}, {"learning_rate": 0}, {"n_negatives": -1}],
    "skip": [{"learning_rate": -1.0}],
    "drift": [{"delta": 0.0}, {"clock": 0}],
    "stan": [{"k": 0}, {"sample": 0}, {"lambda_position": 0.0}, {"lambda_distance": -1.0}],
    "sknn": [{"max_sessions": 0}, {"session_length": 0}, {"lambda_recency_ms": 0}],
    "sr": [{"steps": 0}, {"query_decay": 0.0}, {"max_neighbours": 0}],
}


def stream_of(n: int = 300) -> list[Interaction]:
    out = []
    history: list[str] = []
    for i in range(n):
        track = f"t{(i * 7) % 23}"
        out.append(
            Interaction(
                user_id=f"u{i % 5}",
                track_id=track,
                ts_ms=1_700_000_000_000 + i * 60_000,
                skipped=i % 4 == 0,
                history=tuple(history[-10:]),
                session_position=i % 12,
                context="playlist" if i % 3 else "radio",
                features={"popularity": 0.1, "mf": 0.2},
            )
        )
        history.append(track)
    return out


def fitted(name: str, seed: int = 7) -> Any:
    model = MODELS[name](seed)
    for x in stream_of():
        model.learn_one(x)
    return model


@pytest.mark.parametrize("name", MODELS)
def test_follows_protocol_and_params_round_trip(name: str) -> None:
    model = MODELS[name](3)
    assert isinstance(model, OnlineModel)
    params = get_params(model)
    assert params["seed"] == 3
    twin = clone(model)
    assert type(twin) is type(model) and get_params(twin) == params


@pytest.mark.parametrize("name", MODELS)
def test_rejects_bad_arguments(name: str) -> None:
    for bad in BAD_ARGS[name]:
        with pytest.raises(ValueError):
            type(MODELS[name](0))(**bad)


@pytest.mark.parametrize("name", MODELS)
def test_predicts_before_learning_and_on_unseen_ids(name: str) -> None:
    fresh = MODELS[name](0)
    value = fresh.predict_one(Interaction("nobody", "nothing", 0, history=("x",)))
    assert isinstance(value, float)
    model = fitted(name)
    unseen = Interaction("new-user", "new-track", 1_800_000_000_000, history=("new-a", "t3"))
    value = model.predict_one(unseen)
    assert isinstance(value, float) and value == value  # finite, not NaN
    if hasattr(model, "candidates"):
        recs = model.candidates(Interaction("new-user", history=("t3",)), 5)
        assert len(recs) <= 5
        assert all(isinstance(t, str) for t in recs)


@pytest.mark.parametrize("name", MODELS)
def test_learns_something(name: str) -> None:
    model = fitted(name)
    known = stream_of()[-1]
    if name == "drift":
        assert 0.0 < model.predict_one(known) < 1.0
    elif name == "skip":
        assert model.n_learned == len(stream_of())
    else:
        assert model.predict_one(known) != 0.0 or model.predict_one(
            Interaction(known.user_id, "t0", known.ts_ms, history=known.history)
        ) != 0.0


@pytest.mark.parametrize("name", MODELS)
def test_deterministic_under_seed(name: str) -> None:
    probes = [
        Interaction(f"u{i}", f"t{i}", 1_700_000_500_000, history=("t1", "t2")) for i in range(6)
    ]
    a, b = fitted(name, seed=11), fitted(name, seed=11)
    assert [a.predict_one(x) for x in probes] == [b.predict_one(x) for x in probes]
    if hasattr(a, "candidates"):
        q = Interaction("u1", history=("t1", "t8"))
        assert a.candidates(q, 10) == b.candidates(q, 10)


@pytest.mark.parametrize("name", MODELS)
def test_predicting_unseen_ids_does_not_grow_memory(name: str) -> None:
    model = fitted(name)
    before = state_bytes(model)
    for i in range(50):
        x = Interaction(f"ghost-user-{i}", f"ghost-track-{i}", 1_700_000_900_000,
                        history=(f"ghost-h-{i}",))
        model.predict_one(x)
        if hasattr(model, "candidates"):
            model.candidates(x, 5)
        if hasattr(model, "score_many"):
            model.score_many(x, [f"ghost-{i}", "t1"])
    assert state_bytes(model) == before


def state_bytes(model: Any) -> int:
    """Size of the model's exported state (what a checkpoint holds of it)."""
    manifest, arrays = model.export_state()
    return len(pack_state(manifest, arrays))


def restored(model: Any) -> Any:
    """``model`` through a checkpoint's own encoding: JSON manifest + .npz arrays."""
    manifest, arrays = unpack_state(pack_state(*model.export_state()))
    return type(model).import_state(manifest, arrays)


def probes() -> list[Interaction]:
    return [
        Interaction(f"u{i}", f"t{(i * 5) % 23}", 1_700_000_900_000 + i, history=("t1", "t8"),
                    context="radio", features={"popularity": 0.1, "mf": 0.3})
        for i in range(8)
    ]


@pytest.mark.parametrize("name", MODELS)
def test_state_round_trip_behaves_exactly_like_the_original(name: str) -> None:
    """export_state -> import_state: the same predictions and candidates now, and the same
    ones again after both learn the same further plays (random draws included)."""
    model = fitted(name)
    twin = restored(model)
    for x in probes():
        assert twin.predict_one(x) == model.predict_one(x)
    if hasattr(model, "candidates"):
        q = Interaction("u1", history=("t1", "t8"))
        assert twin.candidates(q, 10) == model.candidates(q, 10)
    for x in stream_of(120)[::-1]:  # different plays than before, in another order
        model.learn_one(x)
        twin.learn_one(x)
    for x in probes():
        assert twin.predict_one(x) == model.predict_one(x)
    m1, a1 = model.export_state()
    m2, a2 = twin.export_state()
    assert m1 == m2 and a1.keys() == a2.keys()
    assert all(np.array_equal(a1[k], a2[k]) and a1[k].dtype == a2[k].dtype for k in a1)


@pytest.mark.parametrize("name", MODELS)
def test_exported_state_is_json_and_numeric_arrays_only(name: str) -> None:
    import json

    manifest, arrays = fitted(name).export_state()
    assert json.loads(json.dumps(manifest, allow_nan=False)) == manifest
    assert all(isinstance(a, np.ndarray) and a.dtype.kind in "biuf" for a in arrays.values())


@pytest.mark.parametrize("name", MODELS)
def test_import_rejects_each_corrupted_array_naming_it(name: str) -> None:
    """Every array, replaced by one of the wrong dtype, then (when it has values) by one
    with a NaN or a huge value: import_state raises ValueError naming that array."""
    model = fitted(name)
    manifest, arrays = model.export_state()
    for key, array in arrays.items():
        wrong = dict(arrays)
        wrong[key] = array.astype(np.complex64 if array.dtype.kind != "c" else np.int8)
        with pytest.raises(ValueError, match=key.split(".")[0]):
            type(model).import_state(manifest, wrong)
        if array.size and array.dtype.kind in "fi":
            bad = dict(arrays)
            spoiled = array.copy()
            spoiled.flat[-1] = np.nan if array.dtype.kind == "f" else np.iinfo(array.dtype).max
            bad[key] = spoiled
            with pytest.raises(ValueError, match=key.split(".")[0]):
                type(model).import_state(manifest, bad)


@pytest.mark.parametrize("name", MODELS)
def test_import_rejects_bad_manifest_fields_naming_them(name: str) -> None:
    model = fitted(name)
    manifest, arrays = model.export_state()
    for field in manifest:
        broken = dict(manifest)
        broken[field] = "not-a-number" if not isinstance(manifest[field], str) else 7
        with pytest.raises(ValueError, match=field):
            type(model).import_state(broken, arrays)
        missing = {k: v for k, v in manifest.items() if k != field}
        with pytest.raises(ValueError, match=field):
            type(model).import_state(missing, arrays)
    bad_params = {**manifest, "params": {**manifest["params"], "seed": True}}
    with pytest.raises(ValueError, match="params.seed"):
        type(model).import_state(bad_params, arrays)
