"""Every variant's bans stay inside the ban flags, and its ids equal recommend()'s in
settings the replay tests do not cover (found by review17b, session 17)."""

from __future__ import annotations

import numpy as np
import pytest

from stream.core.events import PlayEvent
from stream.core.recommender import VARIANTS, Recommender, SeenTracks
from stream.core.session import UserState, update_session


def _trained(n_tracks: int, n: int, **kw: object) -> tuple[Recommender, dict[str, UserState]]:
    rec, states = Recommender(seed=0, **kw), {}  # type: ignore[arg-type]
    for i in range(n):
        e = PlayEvent(f"u{i % 3}", f"t{(i * 7) % n_tracks}", 1_700_000_000_000 + i * 1000,
                      200_000, f"e{i}")
        up = update_session(states.get(e.user_id), e)
        rec.learn_one(up, e)
        states[e.user_id] = up.state
    return rec, states


def test_session_kernels_never_write_past_the_ban_flags() -> None:
    """sknn/stan/sr (rank_stan / rank_sr: ``_ban``, no bounds checks) with an ``exclude``
    of another vocabulary (rows past this catalogue), through recommend() and
    component_ids(): nothing past the ban flags is written, and the flags end clear."""
    small, states = _trained(40, 300)
    big, _ = _trained(500, 1000)
    foreign = SeenTracks(big.vocabulary)
    foreign.add("t499")
    assert int(foreign.rows()[0]) >= 64
    backing = np.ones(4096, dtype=bool)
    backing[:64] = False
    small.__dict__["_ban"] = backing[:64]
    for variant in ("sknn", "stan", "sr"):
        for call in ("recommend", "component_ids"):
            try:
                if call == "recommend":
                    small.recommend(states["u1"], 10, 1_700_000_400_000, exclude=foreign,
                                    variant=variant)
                else:
                    small.component_ids(states["u1"], 10, 1_700_000_400_000, (variant,),
                                        exclude=foreign)
            except IndexError:
                pass  # refusing the foreign rows is fine; writing past the flags is not
            assert backing[64:].all(), (variant, call, np.flatnonzero(~backing[64:]) + 64)
            assert not backing[:64].any(), (variant, call)


def _events(n: int, n_tracks: int, n_users: int, artists: bool) -> list[PlayEvent]:
    return [PlayEvent(f"u{i % n_users}", f"t{(i * 7 + i // 13) % n_tracks}",
                      1_700_000_000_000 + i * 45_000, 200_000 if i % 4 else 10_000, f"e{i}",
                      artist_id=f"a{((i * 7 + i // 13) % n_tracks) % 5}" if artists else None)
            for i in range(n)]


@pytest.mark.parametrize("kw", [
    {"max_per_artist": 1},
    {"_pop_penalty": 0.5},  # SR through the numpy reference
    {"repeats": 5},
    {"blend": "fixed", "weights": {"popularity": 0.3, "cooccurrence": 1.0, "mf": 0.5,
                                   "skip": 0.4}},
    {"session_scope": "recent", "mf_candidates": True},
    {"blend": "fixed", "max_per_artist": 2},
])
def test_component_ids_are_recommends_in_other_settings(kw: dict[str, object]) -> None:
    """component_ids (the replay's and the worker's path) against recommend() in the
    settings the replay tests leave out, with an exclusion, k = 1, k past the catalogue
    and cold starts."""
    kw = dict(kw)
    penalty = kw.pop("_pop_penalty", None)
    rec = Recommender(seed=0, **kw)  # type: ignore[arg-type]
    if penalty is not None:
        rec.rules.pop_penalty = penalty
    states: dict[str, UserState] = {}
    seen: dict[str, SeenTracks] = {}
    checked = 0
    for i, e in enumerate(_events(400, 30, 7, artists=True)):
        before = states.get(e.user_id) or UserState(user_id=e.user_id)
        history = seen.setdefault(e.user_id, SeenTracks(rec.vocabulary))
        if i % 5 == 0:
            for k in (1, 10, 50):
                for excl in ((), history):
                    got = rec.component_ids(before, k, e.ts_ms, VARIANTS, exclude=excl)
                    want = [[r.track_id for r in rec.recommend(before, k, e.ts_ms,
                                                               exclude=excl, variant=v)]
                            for v in VARIANTS]
                    assert got == want, (kw, i, k)
                    checked += 1
        up = update_session(states.get(e.user_id), e)
        rec.learn_one(up, e)
        states[e.user_id] = up.state
        history.add(e.track_id)
    assert checked == 80 * 6
