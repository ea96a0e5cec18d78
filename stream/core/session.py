"""Per-user listening state and its pure update function.

The state is what a Faust table keeps per user (serialised with :meth:`UserState.to_dict`):
the current session (split by an inactivity gap or an explicit ``session_id``), the most
recent tracks, the skip streak, lifetime counts, and a bounded ring of recently applied
event-id fingerprints that makes re-delivered events (at-least-once) no-ops.

>>> from stream.core.events import InvalidField, PlayEvent, check_text
>>> ev = PlayEvent("u1", "t1", 1_700_000_000_000, 200_000, "e1")
>>> up = update_session(None, ev)
>>> up.state.plays_total, up.state.recent, up.duplicate
(1, ['t1'], False)
>>> update_session(up.state, ev).duplicate
True
"""

from __future__ import annotations

import base64
import hashlib
from array import array
from dataclasses import dataclass, field
from typing import Any, Final

from stream.core.contexts import CONTEXTS, fold_context
from stream.core.events import InvalidField, PlayEvent, check_text
from stream.core.ids import canonical
from stream.core.slots import positional_builder

DEFAULT_SESSION_GAP_MS: Final = 30 * 60 * 1000
DEFAULT_MAX_RECENT: Final = 30
DEFAULT_MAX_SEEN: Final = 48
STATE_VERSION: Final = 1


def event_fingerprint(event_id: str) -> int:
    """A 63-bit fingerprint of an event id (one signed 64-bit slot in the ring)."""
    digest = hashlib.blake2b(event_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _ring(values: Any) -> array[int]:
    """The fingerprint ring from its serialised forms (base64 of int64s, or a list of ints)."""
    if isinstance(values, str):
        ring = array("q")
        ring.frombytes(base64.b64decode(values))
        return ring
    return array("q", values or ())


@dataclass(slots=True)
class UserState:
    """Everything the worker remembers about one listener. Mutable only inside this module."""

    user_id: str
    session_key: str = ""
    sessions_total: int = 0
    session_start_ms: int = 0
    session_plays: int = 0
    session_skips: int = 0
    last_ts_ms: int = 0
    recent: list[str] = field(default_factory=list)
    recent_skipped: list[bool] = field(default_factory=list)
    skip_streak: int = 0
    plays_total: int = 0
    skips_total: int = 0
    #: Count of events applied; a per-user monotonic sequence number (Redis write guard).
    seq: int = 0
    last_event_id: str = ""
    last_event_ts_ms: int = 0
    #: Kafka position of the last applied record: a replay after a crash (offsets at or
    #: below it on the same partition) is a duplicate however many plays it spans
    last_partition: int = -1
    last_offset: int = -1
    #: Kafka offset of the play that created this state from nothing (-1: unknown, a record
    #: written before this field existed). A listener's states are ordered by (born_offset,
    #: seq): ``seq`` starts again at 1 after a forget or an eviction, and a later life's
    #: first play lies later in the listener's partition (stream.worker.topics.state_order)
    born_offset: int = -1
    #: fingerprints of the last ``max_seen`` applied event ids (8 bytes each, one object)
    seen: array[int] = field(default_factory=lambda: array("q"))
    #: the recommender's partition-local model state of this listener (MF factors, own
    #: history): an opaque record of :mod:`stream.core.listener_record`, "" when there is none.
    #: It lives here so it moves with the listener's partition and is restored from the
    #: changelog (the global model checkpoint holds item-side state only)
    model: str = ""
    #: the listening context of the last play, folded (one of
    #: :data:`stream.core.contexts.CONTEXTS`, all that the skip model reads of it; "" = none
    #: given): a ranking for the next play scores the skip model in it (the listener is
    #: likely still in the car). Folded, it is one shared string, never a copy per listener
    last_context: str = ""

    @property
    def last_track(self) -> str | None:
        return self.recent[-1] if self.recent else None

    def skip_rate(self) -> float:
        """Lifetime skip share, with a weak prior of 0.25 so new users are not 0 or 1."""
        return (self.skips_total + 0.25) / (self.plays_total + 1.0)

    def copy(self) -> UserState:
        # once per applied play: slot by slot (4.7 -> ~1.5 us against the keyword-argument
        # constructor); the scalars are listed in _SCALARS and a unit test checks both agree
        new = _new_state(UserState)
        new.user_id = self.user_id
        new.session_key = self.session_key
        new.sessions_total = self.sessions_total
        new.session_start_ms = self.session_start_ms
        new.session_plays = self.session_plays
        new.session_skips = self.session_skips
        new.last_ts_ms = self.last_ts_ms
        new.skip_streak = self.skip_streak
        new.plays_total = self.plays_total
        new.skips_total = self.skips_total
        new.seq = self.seq
        new.last_event_id = self.last_event_id
        new.last_event_ts_ms = self.last_event_ts_ms
        new.last_partition = self.last_partition
        new.last_offset = self.last_offset
        new.born_offset = self.born_offset
        new.model = self.model
        new.last_context = self.last_context
        new.recent = self.recent.copy()
        new.recent_skipped = self.recent_skipped.copy()
        new.seen = self.seen[:]
        return new

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in _SCALARS}
        out["recent"] = list(self.recent)
        out["recent_skipped"] = [int(s) for s in self.recent_skipped]
        out["seen"] = base64.b64encode(self.seen.tobytes()).decode()
        out["v"] = STATE_VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UserState:
        kwargs = {name: data[name] for name in _SCALARS if name in data}
        if type(kwargs.get("model", "")) is not str:  # checked in full where it is used
            kwargs["model"] = ""
        kwargs["last_context"] = _stored_context(kwargs.get("last_context", ""))
        return cls(
            **kwargs,
            # one shared string per track id, as parsing gives live (stream.core.ids): a
            # restored listener's ring costs 8 bytes per track, not a copy of each id
            recent=[canonical(t) if type(t) is str else t for t in data.get("recent", [])],
            recent_skipped=[bool(s) for s in data.get("recent_skipped", [])],
            seen=_ring(data.get("seen")),
        )


#: the shared string of each folded context (fold_context builds a new one)
_FOLDED: Final = {c: c for c in CONTEXTS}


def folded_context(context: str | None) -> str:
    """``UserState.last_context`` for a play's ``context``: "" when none is given, else
    its folded value (:func:`stream.core.contexts.fold_context`) as one shared string."""
    if not context:
        return ""
    shared = _FOLDED.get(context)
    return shared if shared is not None else _FOLDED[fold_context(context)]


def _stored_context(value: object) -> str:
    """A stored ``last_context`` as a play's ``context`` is checked
    (:func:`stream.core.events.check_text`), then folded (:func:`folded_context`); "" when
    it is not one (a changelog record is untrusted: a wrong type, an oversized or
    control-character string is dropped, the state kept)."""
    if value == "":
        return ""
    try:
        return folded_context(check_text(value, "last_context"))
    except InvalidField:
        return ""


_new_state = object.__new__

_SCALARS: Final = (
    "user_id",
    "session_key",
    "sessions_total",
    "session_start_ms",
    "session_plays",
    "session_skips",
    "last_ts_ms",
    "skip_streak",
    "plays_total",
    "skips_total",
    "seq",
    "last_event_id",
    "last_event_ts_ms",
    "last_partition",
    "last_offset",
    "born_offset",
    "model",
    "last_context",
)


@dataclass(frozen=True, slots=True)
class SessionUpdate:
    """Result of applying one event.

    ``before`` is the state the event was applied to (a copy: the recommender learns
    transitions from it); ``state`` the new state. On a duplicate, ``state is before``.
    """

    state: UserState
    before: UserState
    duplicate: bool
    new_session: bool
    is_skip: bool
    first_event: bool


#: SessionUpdate(state, before, duplicate, new_session, is_skip, first_event), once per play
#: without the frozen __init__ (stream.core.slots)
_build_update: Final = positional_builder(SessionUpdate)


def update_session(
    state: UserState | None,
    event: PlayEvent,
    *,
    gap_ms: int = DEFAULT_SESSION_GAP_MS,
    max_recent: int = DEFAULT_MAX_RECENT,
    max_seen: int = DEFAULT_MAX_SEEN,
    position: tuple[int, int] | None = None,
) -> SessionUpdate:
    """Apply ``event`` to ``state`` (None for a listener never seen) and return the result.

    Idempotent twice over: with ``position`` = (partition, offset) of the Kafka record, once
    the listener has more plays than the ring holds, a record at or below the last applied
    offset of the same partition (a replay after a crash or rebalance, however long) is a
    duplicate; and an event whose id fingerprint is in the
    recent ring (a producer re-send, at a new offset) is a duplicate. Either returns
    ``duplicate=True`` and the unchanged state. Out-of-order events are applied
    (counts stay exact) but never move ``last_ts_ms`` backwards.
    """
    first = state is None
    before = UserState(user_id=event.user_id) if state is None else state
    if (
        position is not None
        # while the ring still holds every play applied, it alone is exact: the offset
        # guard assumes in-order delivery, which Faust breaks right after a restart (a
        # worker applied offsets ahead of the committed one before seeking back; see
        # docs/reliability.md), and would then drop the re-read plays as replays
        and before.plays_total > len(before.seen)
        and position[0] == before.last_partition
        and position[1] <= before.last_offset
    ):
        return _build_update(before, before, True, False, False, False)
    fp = event_fingerprint(event.event_id)
    if fp in before.seen:
        return _build_update(before, before, True, False, False, False)

    new = before.copy()
    skip = event.is_skip()
    gap = event.ts_ms - before.last_ts_ms
    explicit_switch = event.session_id is not None and event.session_id != before.session_key
    implicit_switch = event.session_id is None and (first or gap > gap_ms)
    new_session = first or explicit_switch or implicit_switch
    if new_session:
        new.sessions_total += 1
        new.session_key = event.session_id or f"{event.user_id}#{new.sessions_total}"
        new.session_start_ms = event.ts_ms
        new.session_plays = 0
        new.session_skips = 0
    new.session_plays += 1
    new.plays_total += 1
    if skip:
        new.session_skips += 1
        new.skips_total += 1
        new.skip_streak += 1
    else:
        new.skip_streak = 0
    new.last_context = folded_context(event.context)
    new.recent.append(event.track_id)
    new.recent_skipped.append(skip)
    if len(new.recent) > max_recent:
        del new.recent[: len(new.recent) - max_recent]
        del new.recent_skipped[: len(new.recent_skipped) - max_recent]
    new.seen.append(fp)
    if len(new.seen) > max_seen:
        del new.seen[: len(new.seen) - max_seen]
    new.last_ts_ms = max(before.last_ts_ms, event.ts_ms)
    new.seq += 1
    new.last_event_id = event.event_id
    new.last_event_ts_ms = event.ts_ms
    if position is not None:
        new.last_partition, new.last_offset = position
        if first:
            new.born_offset = position[1]
    return _build_update(new, before, False, new_session, skip, first)
