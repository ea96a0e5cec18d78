"""review17b: inputs the new compiled ids paths (session kernels, rank_components, the
40-feature blend) must survive or agree on with recommend()."""

from __future__ import annotations

import numpy as np

from stream.core.events import PlayEvent
from stream.core.recommender import Recommender, SeenTracks
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
