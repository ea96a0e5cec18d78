"""Session state: pure update, idempotency, sessionisation, bounds."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stream.core.events import PlayEvent
from stream.core.ids import canonical
from stream.core.session import UserState, update_session

T0 = 1_700_000_000_000
MIN = 60_000


def ev(
    track: str, ts: int, *, played: int = 200_000, eid: str | None = None, **kw: object
) -> PlayEvent:
    return PlayEvent("u", track, ts, played, eid or f"{track}@{ts}", **kw)  # type: ignore[arg-type]


def apply(events: list[PlayEvent], **kw: int) -> UserState:
    state = None
    for e in events:
        state = update_session(state, e, **kw).state
    assert state is not None
    return state


def test_first_event_starts_a_session() -> None:
    up = update_session(None, ev("a", T0))
    assert up.first_event and up.new_session and not up.duplicate
    s = up.state
    assert (s.plays_total, s.sessions_total, s.session_plays, s.seq) == (1, 1, 1, 1)
    assert s.recent == ["a"] and s.last_event_ts_ms == T0


def test_inactivity_gap_splits_sessions() -> None:
    s = apply([ev("a", T0), ev("b", T0 + 5 * MIN), ev("c", T0 + 50 * MIN)], gap_ms=30 * MIN)
    assert s.sessions_total == 2 and s.session_plays == 1 and s.plays_total == 3
    assert s.session_start_ms == T0 + 50 * MIN


def test_explicit_session_ids_win_over_the_gap() -> None:
    s = apply(
        [
            ev("a", T0, session_id="s1"),
            ev("b", T0 + 90 * MIN, session_id="s1"),
            ev("c", T0 + 91 * MIN, session_id="s2"),
        ]
    )
    assert s.sessions_total == 2 and s.session_key == "s2"


def test_skip_streak_and_counts() -> None:
    s = apply([ev("a", T0, played=5_000), ev("b", T0 + 1, played=6_000), ev("c", T0 + 2)])
    assert s.skip_streak == 0 and s.skips_total == 2 and s.session_skips == 2
    s2 = update_session(s, ev("d", T0 + 3, played=1_000)).state
    assert s2.skip_streak == 1 and s2.recent_skipped[-1] is True


def test_duplicates_are_no_ops() -> None:
    first = update_session(None, ev("a", T0, eid="e1"))
    again = update_session(first.state, ev("a", T0, eid="e1"))
    assert again.duplicate and again.state is first.state
    assert again.state.plays_total == 1


def test_out_of_order_event_counts_but_does_not_move_time_back() -> None:
    s = apply([ev("a", T0 + 10 * MIN), ev("b", T0)])
    assert s.plays_total == 2 and s.last_ts_ms == T0 + 10 * MIN


def test_update_does_not_mutate_its_input() -> None:
    s1 = apply([ev("a", T0)])
    snapshot = s1.to_dict()
    update_session(s1, ev("b", T0 + 1))
    assert s1.to_dict() == snapshot


def test_serialisation_round_trip() -> None:
    s = apply([ev("a", T0, played=1), ev("b", T0 + 1)])
    assert UserState.from_dict(s.to_dict()) == s


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d", "e"]),
            st.integers(min_value=0, max_value=10 * 3_600_000),
            st.integers(min_value=0, max_value=400_000),
            st.integers(min_value=0, max_value=40),  # event id: small space -> duplicates
        ),
        max_size=60,
    )
)
def test_property_counts_are_exact_and_state_bounded(rows: list[tuple[str, int, int, int]]) -> None:
    events = [ev(t, T0 + dt, played=p, eid=f"e{i}") for t, dt, p, i in rows]
    state = None
    applied_ids: list[str] = []
    for e in events:
        up = update_session(state, e, max_recent=7, max_seen=64)
        assert up.duplicate == (e.event_id in applied_ids)
        if not up.duplicate:
            applied_ids.append(e.event_id)
        state = up.state
    if state is None:
        return
    assert state.plays_total == len(applied_ids) == state.seq
    assert len(state.recent) <= 7 and len(state.recent) == len(state.recent_skipped)
    assert len(state.seen) <= 64
    assert 1 <= state.sessions_total <= state.plays_total
    assert 0 <= state.skips_total <= state.plays_total
    assert state.session_plays <= state.plays_total
    assert UserState.from_dict(state.to_dict()) == state


def test_replay_longer_than_the_ring_is_still_a_duplicate_by_offset() -> None:
    # a heavy listener's replay after a crash can span more plays than the id ring holds
    events = [ev(f"t{i}", T0 + i, eid=f"e{i}") for i in range(100)]
    state = None
    for offset, e in enumerate(events):
        state = update_session(state, e, max_seen=8, position=(3, offset)).state
    assert state is not None and state.plays_total == 100
    for offset, e in enumerate(events):  # the whole run again, same partition and offsets
        up = update_session(state, e, max_seen=8, position=(3, offset))
        assert up.duplicate
    # without positions only the ring protects, and 100 > 8 slots would double count
    assert not update_session(state, events[0], max_seen=8).duplicate
    # a producer re-send arrives at a NEW offset: the id ring catches it
    assert update_session(state, events[-1], max_seen=8, position=(3, 500)).duplicate


def test_out_of_order_delivery_loses_nothing_while_the_ring_holds_every_play() -> None:
    # the crash-loop failure: after a restart Faust delivered a listener's offset 35 before
    # seeking back to the committed offset 7, so the re-read offsets below 35 looked replayed
    events = {offset: ev(f"t{offset}", T0 + offset, eid=f"e{offset}") for offset in range(41)}
    state = None
    for offset in list(range(0, 7)) + [35] + list(range(7, 41)):
        up = update_session(state, events[offset], max_seen=48, position=(1, offset))
        state = up.state
    assert state is not None
    # every play once (35's second delivery is a duplicate by id): nothing lost while the
    # listener has fewer plays than the ring holds. Past that the offset guard is back on,
    # and the same delivery order would still drop plays (docs/reliability.md).
    assert state.plays_total == 41


def test_copy_carries_every_field_and_shares_no_container() -> None:
    import dataclasses
    from array import array

    from stream.core.session import _SCALARS, UserState

    values = {
        f.name: (f"v-{f.name}" if f.type in ("str", str) else 7 + i)
        for i, f in enumerate(dataclasses.fields(UserState))
        if f.name in _SCALARS
    }
    state = UserState(**values, recent=["a", "b"], recent_skipped=[True, False],
                      seen=array("q", [1, 2, 3]))
    # every dataclass field is a scalar listed in _SCALARS or one of the three containers
    assert {f.name for f in dataclasses.fields(UserState)} == {
        *_SCALARS, "recent", "recent_skipped", "seen"
    }
    twin = state.copy()
    assert twin == state and twin is not state
    twin.recent.append("c")
    twin.recent_skipped.append(True)
    twin.seen.append(4)
    assert state.recent == ["a", "b"] and state.recent_skipped == [True, False]
    assert list(state.seen) == [1, 2, 3]


def test_a_restored_listener_shares_the_track_id_strings() -> None:
    """Changelog recovery decodes fresh strings; from_dict swaps them for the process's
    shared ones (as parsing does live), so a restored ring holds references, not copies."""
    from stream.core.checkpoint import pack_state, unpack_state
    from stream.core.models._vocab import Vocabulary

    track = "".join(["restored-", "track-", "42"])  # built at run time: not interned yet
    vocab = Vocabulary()
    vocab.add(track)
    manifest, arrays = unpack_state(pack_state(*vocab.export_state()))  # a checkpoint restore
    restored_vocab = Vocabulary.import_state(manifest, arrays, where="vocabulary")
    shared = restored_vocab.ids[0]
    assert shared is canonical("".join(["restored-track-", "42"]))
    assert next(iter(restored_vocab.index)) is shared

    a = UserState.from_dict({"user_id": "u1", "recent": ["".join(["restored-track-", "42"])]})
    b = UserState.from_dict({"user_id": "u2", "recent": ["".join(["restored-", "track-42"])]})
    assert a.recent[0] is b.recent[0] is shared
    assert a.recent == ["restored-track-42"]


def test_last_context_is_the_last_plays_and_survives_a_round_trip() -> None:
    """``last_context``: the listening context of the latest play, folded as the skip
    model reads it ("" when it gave none), kept through ``to_dict`` / ``from_dict`` (the
    changelog)."""
    s = apply([ev("a", T0, context="radio"), ev("b", T0 + 1, context="editorial_playlist")])
    assert s.last_context == "playlist"
    assert UserState.from_dict(s.to_dict()).last_context == "playlist"
    assert apply([ev("a", T0, context="radio"), ev("b", T0 + 1)]).last_context == ""
    assert apply([ev("a", T0, context="gym")]).last_context == "other"
    # a duplicate changes nothing
    first = apply([ev("a", T0, context="radio")])
    again = update_session(first, ev("a", T0, context="album")).state
    assert again.last_context == "radio"


def test_a_stored_last_context_is_checked_like_a_plays() -> None:
    """The changelog is untrusted: a ``last_context`` that is not a string a play's
    ``context`` could be (wrong type, over MAX_TEXT_LEN, a control character) is dropped
    to "", and the rest of the state restores; an old record without the field restores
    with ""."""
    from stream.core.events import MAX_TEXT_LEN

    data = apply([ev("a", T0, context="radio")]).to_dict()
    for bad in (7, ["car"], "x" * (MAX_TEXT_LEN + 1), "car\x00", None):
        restored = UserState.from_dict({**data, "last_context": bad})
        assert restored.last_context == ""
        assert restored.recent == ["a"]
    del data["last_context"]
    assert UserState.from_dict(data).last_context == ""
    assert UserState.from_dict({**data, "last_context": "radio"}).last_context == "radio"
    assert UserState.from_dict({**data, "last_context": "Station"}).last_context == "radio"
