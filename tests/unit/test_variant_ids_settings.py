"""Every variant's ids equal recommend()'s in settings the replay tests do not cover
(review17b, session 17)."""

from __future__ import annotations

import pytest

from stream.core.events import PlayEvent
from stream.core.recommender import VARIANTS, Recommender, SeenTracks
from stream.core.session import UserState, update_session


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
