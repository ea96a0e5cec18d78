"""Review 18b: the skip penalty's reference path (``Recommender._candidates``) with a
``SeenTracks`` of another vocabulary, whose rows may lie past this catalogue's ban flags
(the compiled paths skip those rows since review17b; this one indexed with them)."""

from __future__ import annotations

from stream.core.events import PlayEvent
from stream.core.recommender import VARIANTS, Recommender, SeenTracks
from stream.core.session import UserState, update_session


def _learned(rec: Recommender, n: int) -> dict[str, UserState]:
    states: dict[str, UserState] = {}
    for i in range(n):
        e = PlayEvent(f"u{i % 3}", f"t{(i * 7) % 11}", 1_700_000_000_000 + i * 45_000,
                      200_000 if i % 4 else 10_000, f"e{i}")
        up = update_session(states.get(e.user_id), e)
        rec.learn_one(up, e)
        states[e.user_id] = up.state
    return states


def test_skip_penalty_path_skips_rows_past_the_catalogue() -> None:
    rec = Recommender(seed=0, weights={"skip": 0.5})
    state = _learned(rec, 60)["u0"]
    other = Recommender(seed=0)
    for t in range(300):
        other.vocabulary.add(f"x{t}")
    foreign = SeenTracks(other.vocabulary)
    for t in range(200, 300):  # rows 200-299: past this catalogue (11 tracks, 64 flags)
        foreign.add(f"x{t}")
    assert foreign.rows().min() >= len(rec._ban_buffer(len(rec.vocabulary)))
    now = 1_700_000_000_000 + 61 * 45_000
    for variant in ("fixed", "blend", "popularity", "cooccurrence"):
        got = [r.track_id for r in rec.recommend(state, 5, now, exclude=foreign,
                                                 variant=variant)]
        # nothing of this catalogue is banned by them: the list without an exclusion
        assert got == [r.track_id for r in rec.recommend(state, 5, now, variant=variant)]
    got_all = rec.component_ids(state, 5, now, VARIANTS, exclude=foreign)
    assert got_all == rec.component_ids(state, 5, now, VARIANTS)
    assert not rec._ban_buffer(len(rec.vocabulary)).any()


def test_integer_weights_compile_no_second_signature() -> None:
    """``weights={"popularity": 1}`` (an int, as the Python API accepts) ranks with the
    float kernels: a second signature compiled on the ranking path (~11 s for
    ``blend_collect_variants``, ~1-2 s for ``rank_components`` / ``rank_query``)."""
    from stream.core.models import _blend_kernels as _bk
    from stream.core.models import _kernels as _k

    kernels = (_bk.blend_collect_variants, _k.rank_components, _k.rank_query)
    now = 1_700_000_000_000 + 61 * 45_000
    rec = Recommender(seed=0, weights={"popularity": 0.5})
    state = _learned(rec, 60)["u0"]
    rec.component_ids(state, 5, now, VARIANTS)
    rec.component_ids(state, 5, now, ("popularity", "fixed"))  # (rank_components)
    rec.recommend(state, 5, now, variant="fixed")
    before = [len(kernel.signatures) for kernel in kernels]
    rec = Recommender(seed=0, weights={"popularity": 1, "cooccurrence": 1, "mf": 0},
                      history_decay=1)
    state = _learned(rec, 60)["u0"]
    rec.component_ids(state, 5, now, VARIANTS)
    rec.component_ids(state, 5, now, ("popularity", "fixed"))  # (rank_components)
    rec.recommend(state, 5, now, variant="fixed")
    assert [len(kernel.signatures) for kernel in kernels] == before
    assert all(type(v) is float for v in rec.blend_weights.values())
