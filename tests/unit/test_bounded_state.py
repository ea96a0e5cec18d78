"""Per-listener and free-text model state stays bounded under hostile ids (issue 15, item 5):
MF user factors are capped (least recently learned out), and free-text play contexts are
folded into a closed set before they become skip-model features."""

from __future__ import annotations

import pytest

from stream.config import load_settings
from stream.core.contexts import CONTEXTS, fold_context
from stream.core.events import PlayEvent
from stream.core.models.base import Interaction
from stream.core.models.factorization import ImplicitMF
from stream.core.models.skip import SkipClassifier
from stream.core.recommender import Recommender
from stream.core.session import update_session
from stream.errors import ConfigError


def test_mf_keeps_at_most_max_users_listeners_least_recent_out() -> None:
    mf = ImplicitMF(n_factors=4, seed=0, max_users=3)
    for user in ("a", "b", "c"):
        mf.learn_one(Interaction(user, "t1", 0))
    mf.learn_one(Interaction("a", "t2", 1))  # a is now the most recent
    mf.learn_one(Interaction("d", "t1", 2))  # b (least recent) goes
    assert list(mf.user_factors) == ["c", "a", "d"] and mf.users_evicted == 1
    for i in range(1000):
        mf.learn_one(Interaction(f"junk-{i}", f"j{i}", 3 + i))
    assert len(mf.user_factors) == 3 and mf.users_evicted == 1001


def test_limit_users_trims_at_once_and_rejects_bad_values() -> None:
    rec = Recommender(seed=0)
    states: dict = {}
    for i in range(20):
        event = PlayEvent(f"u{i}", f"t{i % 5}", 1_700_000_000_000 + i, 200_000, f"e{i}")
        up = update_session(states.get(f"u{i}"), event)
        rec.learn_one(up)
        states[f"u{i}"] = up.state
    assert len(rec.mf.user_factors) == 20
    assert rec.limit_users(5) == 15
    assert list(rec.mf.user_factors) == [f"u{i}" for i in range(15, 20)]
    restored = Recommender.restore(rec.snapshot()).mf
    assert list(restored.user_factors) == list(rec.mf.user_factors)
    with pytest.raises(ValueError, match="max_users"):
        ImplicitMF(max_users=0)
    with pytest.raises(ValueError, match="max_users"):
        rec.limit_users(-1)


def test_max_users_setting_is_validated_at_start_up() -> None:
    assert load_settings(env={}, file=None).max_users == 500_000
    assert load_settings(env={"STREAM_MAX_USERS": "0"}, file=None).max_users == 0
    with pytest.raises(ConfigError, match="'max_users'"):
        load_settings(env={"STREAM_MAX_USERS": "-5"}, file=None)
    with pytest.raises(ConfigError, match="'max_users'"):
        load_settings(env={"STREAM_MAX_USERS": "many"}, file=None)


@pytest.mark.parametrize(
    ("raw", "folded"),
    [("playlist", "playlist"), ("  ALBUM ", "album"), ("editorial_playlist", "playlist"),
     ("Library", "collection"), ("my radio mix", "radio"), ("\u202e", "other"),
     ("x" * 256, "other"), ("", "none"), (None, "none")],
)
def test_contexts_fold_into_the_closed_set(raw: str | None, folded: str) -> None:
    assert fold_context(raw) == folded


def test_skip_model_weights_stay_bounded_under_free_text_contexts() -> None:
    model = SkipClassifier(seed=0)
    for i in range(3000):  # every play a never-seen context string
        model.learn_one(Interaction("u", "t", i, skipped=i % 3 == 0, context=f"junk-{i}"))
    model.learn_one(Interaction("u", "t", 0, context="Radio"))
    names = set(model.classifier.weights)
    contexts = {n for n in names if n.startswith("context=")}
    assert contexts == {"context=other", "context=radio"}
    assert contexts <= {f"context={c}" for c in CONTEXTS} and len(names) <= 4 + len(CONTEXTS)


def test_freeze_survivors_collects_young_cycles_then_freezes_the_rest() -> None:
    import gc
    import weakref

    from stream.worker.heap import freeze_survivors

    class Node:
        pass

    gc.collect()
    try:
        garbage = Node()
        garbage.me = garbage  # type: ignore[attr-defined]  # a young reference cycle
        gone = weakref.ref(garbage)
        del garbage
        kept = [Node() for _ in range(1000)]
        before = gc.get_freeze_count()
        seconds = freeze_survivors()
        assert gone() is None  # collected, not frozen
        assert gc.get_freeze_count() >= before + 1000 and seconds >= 0
        assert len(gc.get_objects(generation=2)) < 1000  # the full scans skip them now
        del kept  # frozen objects are still freed by reference counting
    finally:
        gc.unfreeze()
    with pytest.raises(ConfigError, match="'gc_freeze_interval_s'"):
        load_settings(env={"STREAM_GC_FREEZE_INTERVAL_S": "-1"}, file=None)


def test_the_listener_cap_and_its_lru_order_survive_a_checkpoint() -> None:
    mf = ImplicitMF(n_factors=4, seed=0, max_users=3)
    for i, user in enumerate(("a", "b", "c", "a", "d")):
        mf.learn_one(Interaction(user, f"t{i % 2}", i))
    manifest, arrays = mf.export_state()
    back = ImplicitMF.import_state(manifest, arrays)
    assert back.max_users == 3 and back.users_evicted == mf.users_evicted == 1
    assert list(back.user_factors) == list(mf.user_factors) == ["c", "a", "d"]
    back.learn_one(Interaction("e", "t0", 9))  # the least recent ("c") goes, as it would have
    assert list(back.user_factors) == ["a", "d", "e"]
    # a checkpoint holding more listeners than its own cap is refused, naming the field
    manifest["params"]["max_users"] = 2
    with pytest.raises(ValueError, match="user_ids"):
        ImplicitMF.import_state(manifest, arrays)
