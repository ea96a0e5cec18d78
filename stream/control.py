"""Control commands on the control topic (keyed by user id, co-partitioned with plays).

Today one operation: ``forget_user`` -- purge a listener's session state, user-side model
parameters and recommendations (a GDPR-style deletion request).

>>> cmd = parse_control(encode_forget("u1", request_id="r1"))
>>> cmd.op, cmd.user_id, cmd.request_id
('forget_user', 'u1', 'r1')
>>> parse_control(b'{"op": "drop_tables"}').reason
'bad_value'
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Final

import orjson

from stream.events import MAX_ID_LEN, Rejection

OPERATIONS: Final = ("forget_user",)


@dataclass(frozen=True, slots=True)
class ControlCommand:
    op: str
    user_id: str
    request_id: str
    requested_at_ms: int


def encode_forget(user_id: str, request_id: str | None = None) -> bytes:
    return orjson.dumps(
        {
            "op": "forget_user",
            "user_id": user_id,
            "request_id": request_id or uuid.uuid4().hex,
            "requested_at": int(time.time() * 1000),
        }
    )


def parse_control(raw: bytes | None) -> ControlCommand | Rejection:
    """Validate a control message; never raises."""
    if raw is None or len(raw) > 4096:
        return Rejection("oversized" if raw else "not_json", "control message empty or > 4 KiB")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Rejection("not_json", f"invalid JSON: {str(exc)[:120]}")
    if not isinstance(obj, dict):
        return Rejection("not_object", "control message must be a JSON object")
    op = obj.get("op")
    if op not in OPERATIONS:
        return Rejection("bad_value", f"unknown op {str(op)[:40]!r}; expected {OPERATIONS}")
    user = obj.get("user_id")
    if not isinstance(user, str | int) or isinstance(user, bool) or not str(user):
        return Rejection("missing_field", "'user_id' (string) is required")
    if len(str(user)) > MAX_ID_LEN:
        return Rejection("string_too_long", "'user_id' too long")
    req = obj.get("request_id")
    requested = obj.get("requested_at")
    return ControlCommand(
        op=op,
        user_id=str(user),
        request_id=str(req)[:128] if req is not None else "",
        requested_at_ms=int(requested) if isinstance(requested, int) else 0,
    )
