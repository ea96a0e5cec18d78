"""What bounds memory per event and per listener (moved from
tests/integration/test_security.py: it needs no service). Catalogue growth: see
docs/reliability.md "Resource limits"."""

from __future__ import annotations

from stream.core.events import MAX_EVENT_BYTES, MAX_ID_LEN, PlayEvent, parse_event
from stream.core.session import update_session


def test_resource_limits_exist() -> None:
    now = 1_800_000_000_000
    big = b'{"user_id": "u", "track_id": "t", "ts": 1, "pad": "' + b"x" * MAX_EVENT_BYTES + b'"}'
    assert getattr(parse_event(big, now_ms=now), "reason", None) == "oversized"
    long_id = ('{"user_id": "' + "u" * (MAX_ID_LEN + 1) + '", "track_id": "t", "ts": '
               f'{now}, "ms_played": 1}}').encode()
    assert getattr(parse_event(long_id, now_ms=now), "reason", None) == "string_too_long"
    state = None
    for i in range(1000):
        state = update_session(
            state, PlayEvent("u", f"t{i}", now + i, 1000, f"e{i}"), max_recent=30, max_seen=64
        ).state
    assert state is not None
    assert len(state.recent) == 30 and len(state.seen) == 64 and state.plays_total == 1000
