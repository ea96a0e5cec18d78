"""Control commands on the control topic (keyed by user id, co-partitioned with plays).

Today one operation: ``forget_user`` -- purge a listener's session state, user-side model
parameters and recommendations (a GDPR-style deletion request).

A command is admitted (:class:`ControlGate`) only if it is signed with a worker key
(:mod:`stream.processing.auth`, purpose ``b"control"``), its Kafka key is its ``user_id``, its
``requested_at`` is within ``control_max_age_s`` of the broker's append time of the record
(the worker's clock on a topic with producer timestamps), and its ``nonce`` was not seen
before. Anything else is a :class:`~stream.core.events.Rejection` the worker dead-letters.

>>> from stream.processing.auth import KeyRing
>>> ring = KeyRing.parse("k1:0123456789abcdef0123")
>>> key, value, headers = forget_record("u1", ring, "ctl", now_ms=1_700_000_000_000)
>>> gate = ControlGate(ring, insecure=False, max_age_ms=900_000)
>>> cmd = gate.admit("ctl", 0, 7, key, value, headers, 1_700_000_000_050, True, 0)
>>> cmd.op, cmd.user_id
('forget_user', 'u1')
>>> gate.admit("ctl", 0, 8, key, value, headers, 1_700_000_000_090, True, 0).reason
'replayed'
>>> parse_control(b'{"op": "drop_tables"}').reason
'bad_value'
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

import orjson

from stream.core.events import (
    InvalidField,
    Rejection,
    check_id,
    escape_text,
    partition_problem,
)
from stream.processing.auth import KeyRing

OPERATIONS: Final = ("forget_user",)
#: the MAC's purpose for control commands (stream.processing.auth)
PURPOSE: Final = b"control"
MAX_CONTROL_BYTES: Final = 4096
MAX_REQUEST_ID_LEN: Final = 128
#: nonces: 16-128 printable characters (encode_forget makes 32 hex digits)
MIN_NONCE_LEN: Final = 16
#: how many nonces are remembered at most (a signed command is needed to add one)
MAX_NONCES: Final = 100_000


@dataclass(frozen=True, slots=True)
class ControlCommand:
    op: str
    user_id: str
    request_id: str
    requested_at_ms: int
    nonce: str = ""


def encode_forget(
    user_id: str, request_id: str | None = None, now_ms: int | None = None, nonce: str | None = None
) -> bytes:
    """The value of a forget command (sign it: :func:`forget_record`)."""
    return orjson.dumps(
        {
            "op": "forget_user",
            "user_id": user_id,
            "request_id": request_id or secrets.token_hex(8),
            "requested_at": int(time.time() * 1000) if now_ms is None else now_ms,
            "nonce": nonce or secrets.token_hex(16),
        }
    )


def forget_record(
    user_id: str,
    ring: KeyRing,
    topic: str,
    *,
    request_id: str | None = None,
    now_ms: int | None = None,
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) of a signed forget command for ``topic`` (unsigned with an
    empty ring)."""
    key = user_id.encode()
    value = encode_forget(user_id, request_id, now_ms)
    return key, value, ring.sign(PURPOSE, topic, key, value)


def parse_control(raw: bytes | None) -> ControlCommand | Rejection:
    """Validate a control message's value (not its signature or freshness: see
    :class:`ControlGate`); never raises."""
    if raw is None or len(raw) > MAX_CONTROL_BYTES:
        return Rejection("oversized" if raw else "not_json", "control message empty or > 4 KiB")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Rejection("not_json", f"invalid JSON: {str(exc)[:120]}")
    if not isinstance(obj, dict):
        return Rejection("not_object", "control message must be a JSON object")
    op = obj.get("op")
    if op not in OPERATIONS:
        return Rejection("bad_value", f"unknown op {escape_text(op, 40)}; expected {OPERATIONS}")
    for name in ("user_id", "requested_at", "nonce"):
        if obj.get(name) is None:
            return Rejection("missing_field", f"control field '{name}' is required")
    requested = obj["requested_at"]
    if type(requested) is not int:
        return Rejection("wrong_type", "'requested_at' must be an integer (epoch ms)")
    try:
        user = check_id(obj["user_id"], "user_id")
        nonce = check_id(obj["nonce"], "nonce", 128, share=False)
        req = obj.get("request_id")
        request_id = "" if req is None else check_id(req, "request_id", MAX_REQUEST_ID_LEN,
                                                     share=False)
    except InvalidField as exc:
        return Rejection(exc.reason, exc.detail)
    except ValueError as exc:  # an integer too large to print
        return Rejection("bad_value", str(exc)[:120])
    if len(nonce) < MIN_NONCE_LEN:
        return Rejection("bad_value", f"'nonce' must be at least {MIN_NONCE_LEN} characters")
    return ControlCommand(
        op=op, user_id=user, request_id=request_id, requested_at_ms=requested, nonce=nonce
    )


class ControlGate:
    """Admits authentic, fresh, first-seen control commands; pure (time passed in).

    Replays: a nonce is remembered (with the record's partition and offset) for
    ``max_age_ms``; the same nonce at another position is a replay, at the same position a
    redelivery (a crash before the offset commit), which is admitted again -- a forget is
    idempotent. Older commands are refused as stale, so the memory is bounded by the
    window. The memory is per process: when it takes a partition over (a restart, a
    rebalance), the worker reads that partition's last ``2 * max_age_ms`` back and
    remembers their nonces (:meth:`learn`) before admitting anything from it."""

    def __init__(
        self,
        ring: KeyRing,
        *,
        insecure: bool,
        max_age_ms: int,
        max_nonces: int = MAX_NONCES,
        partitions: int | None = None,
    ) -> None:
        self.ring = ring
        #: the control topic's partition count: a command not on its key's partition is
        #: refused as ``wrong_partition`` (None: not checked)
        self.partitions = partitions
        self.insecure = insecure
        self.max_age_ms = max_age_ms
        self.max_nonces = max_nonces
        #: nonce -> (partition, offset, expires at ms), oldest first
        self.seen: OrderedDict[str, tuple[int, int, int]] = OrderedDict()

    def admit(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Iterable[tuple[str, bytes]] | Mapping[str, bytes] | None,
        record_ts_ms: int | None,
        log_append_time: bool,
        now_ms: int,
    ) -> ControlCommand | Rejection:
        """The command, or why it is refused. ``record_ts_ms`` is the Kafka record's
        timestamp; it is the reference clock only when the broker set it
        (``log_append_time``: a producer cannot choose it), else ``now_ms`` is."""
        cmd = self._authentic(topic, key, value, headers)
        if isinstance(cmd, Rejection):
            return cmd
        if key is None or key != cmd.user_id.encode():
            shown = "no key" if key is None else f"key {escape_text(key[:64])}"
            return Rejection(
                "key_mismatch", f"record has {shown}, user_id is {escape_text(cmd.user_id, 64)}"
            )
        wrong = partition_problem(key, partition, self.partitions)
        if wrong is not None:
            return wrong
        reference = record_ts_ms if log_append_time and record_ts_ms else now_ms
        age = reference - cmd.requested_at_ms
        if abs(age) > self.max_age_ms:
            return Rejection(
                "stale",
                f"requested_at is {age / 1000:.0f} s from the "
                f"{'broker append time' if reference != now_ms else 'worker clock'} "
                f"(window {self.max_age_ms / 1000:.0f} s)",
            )
        self._expire(now_ms)
        seen = self.seen.get(cmd.nonce)
        if seen is not None and seen[:2] != (partition, offset):
            return Rejection("replayed", f"nonce already used at {topic}[{seen[0]}]@{seen[1]}")
        self._remember(cmd.nonce, partition, offset, now_ms, replace=True)
        return cmd

    def learn(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Iterable[tuple[str, bytes]] | Mapping[str, bytes] | None,
        now_ms: int,
    ) -> bool:
        """Remember the nonce of an earlier record of the topic (read back when this
        process takes a partition over: a restart or a rebalance), if it is authentic.
        Returns whether a nonce was remembered."""
        cmd = self._authentic(topic, key, value, headers)
        if isinstance(cmd, Rejection):
            return False
        self._remember(cmd.nonce, partition, offset, now_ms, replace=False)
        return True

    def _authentic(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Iterable[tuple[str, bytes]] | Mapping[str, bytes] | None,
    ) -> ControlCommand | Rejection:
        """The command if it is signed by a key of the ring (or unsigned, in insecure
        mode) and well-formed, else why not."""
        problem = self.ring.verify(headers, PURPOSE, topic, key, value)
        if problem is not None and not (self.insecure and problem == "unsigned"):
            return Rejection(problem, _auth_detail(problem, self.ring))
        return parse_control(value)

    def _remember(
        self, nonce: str, partition: int, offset: int, now_ms: int, *, replace: bool
    ) -> None:
        """Keep ``nonce`` for ``2 * max_age_ms`` (``replace``: at this position even if it
        is known), the oldest dropped beyond ``max_nonces``."""
        entry = (partition, offset, now_ms + 2 * self.max_age_ms)
        if replace:
            self.seen[nonce] = entry
        else:
            self.seen.setdefault(nonce, entry)
        while len(self.seen) > self.max_nonces:
            self.seen.popitem(last=False)

    def _expire(self, now_ms: int) -> None:
        while self.seen:
            nonce, (_, _, expires) = next(iter(self.seen.items()))
            if expires > now_ms:
                return
            del self.seen[nonce]


def _auth_detail(reason: str, ring: KeyRing) -> str:
    if not ring:
        return "no worker_keys configured: control commands are refused (see worker_insecure)"
    return {
        "unsigned": "control command carries no auth.kid/auth.mac headers",
        "unknown_key": "control command signed with a key id not in worker_keys",
        "bad_signature": "control command's MAC does not verify",
    }.get(reason, reason)


#: claim(key, marker, ttl_ms): SET key marker NX PX ttl_ms GET -- None if the key was free
#: (now claimed), else the marker already there (stream.adapters.redis_store.claim_nonce)
NonceClaim = Callable[[str, str, int], Awaitable[bytes | str | None]]


def nonce_key(app_id: str, nonce: str) -> str:
    """The Redis key remembering a control nonce: in the app's ``forgotten:`` family (the
    worker's ACL has it), the nonce hashed (any printable nonce, a fixed-length key)."""
    digest = hashlib.sha256(b"stream-reco control nonce\0" + nonce.encode()).hexdigest()[:32]
    return f"forgotten:{app_id}:nonce:{digest}"


class NonceLedger:
    """Replay protection shared by every worker of an app (review finding 3): an admitted
    command's nonce is claimed in Redis with ``SET NX PX`` (``2 x control_max_age``; older
    commands are refused as stale anyway) together with the record's position. The same
    nonce at another position -- another partition, another offset, another worker, after
    a restart or a flood -- is a replay; at the same position it is a redelivery (a crash
    before the offset commit) and is admitted again, a forget being idempotent.

    Fails closed: while Redis cannot answer, the check is retried (``on_error`` hears of
    each failure) for up to ``wait_s``; then the command is refused as
    ``nonce_unverified`` (dead-lettered: the operator sends it again)."""

    def __init__(
        self,
        claim: NonceClaim,
        app_id: str,
        ttl_ms: int,
        *,
        wait_s: float = 30.0,
        on_error: Callable[[BaseException], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.claim = claim
        self.app_id = app_id
        self.ttl_ms = ttl_ms
        self.wait_s = wait_s
        self.on_error = on_error
        self.sleep = sleep

    async def check(
        self, cmd: ControlCommand, topic: str, partition: int, offset: int
    ) -> Rejection | None:
        """None if ``cmd`` may be applied (first seen, or redelivered at the same
        position), else why not."""
        marker = f"{topic}[{partition}]@{offset}"
        key = nonce_key(self.app_id, cmd.nonce)
        deadline = time.monotonic() + self.wait_s
        delay = 0.05
        while True:
            try:
                held = await self.claim(key, marker, self.ttl_ms)
                break
            except Exception as exc:  # noqa: BLE001 - Redis trouble: retry, then refuse
                if self.on_error is not None:
                    self.on_error(exc)
                if time.monotonic() >= deadline:
                    return Rejection(
                        "nonce_unverified",
                        f"could not check the nonce in Redis for {self.wait_s:.0f} s "
                        f"({type(exc).__name__}); refused (fail closed)",
                    )
                await self.sleep(delay)
                delay = min(delay * 2, 2.0)
        if held is None:
            return None
        seen = held.decode("utf-8", "replace") if isinstance(held, bytes) else str(held)
        if seen == marker:
            return None
        return Rejection("replayed", f"nonce already used at {escape_text(seen, 200)}")


#: a forget reaches every running worker through its broadcast within seconds; a
#: checkpoint written this long after a forget no longer holds the forgotten state
FORGET_GRACE_MS: Final = 300_000


def forgotten_in_checkpoint(
    users: Iterable[str],
    tombstones: Mapping[str, int],
    created_ms: int,
    digest: Callable[[str], str],
    grace_ms: int = FORGET_GRACE_MS,
) -> list[str]:
    """The listeners of a checkpoint (created at ``created_ms``) whose state a restore
    must drop: those with a forget tombstone (``digest(user)`` -> forget time) no older
    than ``grace_ms`` before the checkpoint. State in a checkpoint written later than
    that was learned after the forget -- every worker dropped the listener when the
    forget's broadcast reached it -- so a listener who came back keeps it (review finding
    5: restore used to drop every tombstoned listener, whatever the times).

    >>> d = {"u1": 1_000, "u2": 1_000}
    >>> forgotten_in_checkpoint(["u1", "u2", "u3"], d, 200_000, str, grace_ms=300_000)
    ['u1', 'u2']
    >>> forgotten_in_checkpoint(["u1"], d, 1_000 + 300_001, str, grace_ms=300_000)
    []
    """
    if not tombstones:
        return []
    out = []
    for user in users:
        forgot = tombstones.get(digest(user))
        if forgot is not None and created_ms <= forgot + grace_ms:
            out.append(user)
    return out
