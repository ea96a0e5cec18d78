"""Review 18c: ``UserState.last_context`` (the listening context of the last play).

Every listener's state keeps it, in memory and in each changelog value, but the skip model
reads only its folded value (:func:`stream.core.contexts.fold_context`, a closed set of ten).
The raw text is not shared between listeners when it comes from a dataset loader (a fresh
string per CSV row) or is over 32 characters (``check_text`` shares only short ones), so a
producer's 256-character contexts cost every listener up to ~1.1 KB of live state (the P3
target is 2 KB per listener in all)."""

from __future__ import annotations

import sys

from stream.core.contexts import CONTEXTS, fold_context
from stream.core.events import MAX_TEXT_LEN, PlayEvent
from stream.core.models.skip import _context_features
from stream.core.session import UserState, update_session

T0 = 1_700_000_000_000


def _state(user: str, context: str | None) -> UserState:
    e = PlayEvent(user, "t1", T0, 200_000, f"{user}-e1", context=context)
    return update_session(None, e).state


def test_listeners_in_the_same_context_share_one_string() -> None:
    # as stream.tools.datasets yields them: equal texts, distinct objects per row
    a = _state("u1", "".join(["editorial_", "playlist"]))
    b = _state("u2", "".join(["editorial", "_playlist"]))
    assert a.last_context == b.last_context != ""
    assert a.last_context is b.last_context


def test_a_long_context_costs_a_listener_no_copy_of_it() -> None:
    long = "\U0001f697" * MAX_TEXT_LEN  # valid for a play: printable, at the limit
    live = _state("u1", long)
    restored = UserState.from_dict({**live.to_dict(), "last_context": long})
    for s in (live, restored):
        assert s.last_context != ""  # a context was given
        assert sys.getsizeof(s.last_context) <= 100, sys.getsizeof(s.last_context)


def test_the_skip_model_sees_the_same_features_from_the_stored_value() -> None:
    """Whatever the state keeps, the skip features of the next play are those of the
    last play's raw context (so keeping less changes no ranking)."""
    raw = [None, "", " ", "car", "Radio Gaga", "editorial_playlist", "NONE", "none",
           "my-own-thing", "Liked_Songs", "\U0001f697" * 40, *CONTEXTS]
    for c in raw:
        stored = _state("u", c).last_context
        assert _context_features(T0, 3, 0.5, stored or None) == \
            _context_features(T0, 3, 0.5, c), c
        assert stored == "" or stored in CONTEXTS or fold_context(stored) == fold_context(c)
