"""Redis recommendation store -- the only module that imports redis.

Contract (see README "Reading recommendations"; the document formats themselves --
a listener's list, a track's similar list, the notification -- are defined in
:mod:`stream.processing.documents`):

- ``{prefix}{user_id}`` (default ``reco:u42``) holds a listener's list, written atomically
  (one ``SET ... EX ttl`` inside a Lua script) with a TTL. ``seq`` is the listener's count
  of applied events: the script refuses a document whose ``seq`` is lower than the stored
  one, so a re-delivered or late write can never regress a newer list.
- ``{similar_prefix}{track_id}`` (default ``similar:t1``) holds a track's similar list.
- ``{catalog_prefix}{track_id}`` (default ``track:t1``) is the track catalogue hash: name,
  artist, album, first_seen, last_seen, plays (:func:`catalog_commands`).
- every accepted list publishes its notification on the channel ``reco-updates``
  (configurable).

The worker side (:class:`RecoWriter`) coalesces updates per user and flushes them in
pipelined batches every few milliseconds, retrying with backoff while Redis is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import orjson
import redis
import redis.asyncio as aioredis
from redis.exceptions import (
    ExecAbortError,
    NoPermissionError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from stream.errors import ConfigError
from stream.processing.documents import (  # noqa: F401 - re-exported for readers
    PendingWrite,
    RecoDocument,
    RecoItem,
    encode_document,
)

logger = logging.getLogger(__name__)

#: WRITE_SCRIPT's replies
WRITTEN: Final = 1
#: refused: the stored document of the same lineage has a higher seq
STALE: Final = 0
#: refused: the key holds another type than a string (a hash, a list, ...); left alone
WRONG_TYPE: Final = -1
#: refused: the stored document of the same lineage has no usable seq; left alone
BAD_SEQ: Final = -2
#: written, but its notification was refused (PUBLISH: NOPERM on the channel, or any other
#: error reply): a server-wide problem, counted once per flush (reason "publish_refused")
NOT_NOTIFIED: Final = 2

WRITE_SCRIPT: Final = """
-- KEYS[1] the listener's key; ARGV: seq, document, ttl, channel, notification, lineage.
-- Reads the stored value's type first, so a key of another type is a status (-1), not
-- an error reply, and is never touched.
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'string' then
  local ok, old = pcall(cjson.decode, redis.call('GET', KEYS[1]))
  -- refuse to go back in the same lineage (the same app's state); a document from another
  -- lineage (a re-deployment under a new app id, a rebuilt state) or that is not a JSON
  -- object is simply replaced
  if ok and type(old) == 'table' and (old['lineage'] or '') == ARGV[6] then
    local seq = tonumber(old['seq'])
    -- not a number, NaN or beyond 2^53: no order to keep, and no reason to trust it
    if seq == nil or seq ~= seq or seq >= 9007199254740992 or seq <= -9007199254740992 then
      return -2
    end
    if seq > tonumber(ARGV[1]) then
      return 0
    end
  end
elseif kind ~= 'none' then
  return -1
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
if ARGV[4] ~= '' then
  -- the document is written either way: a refused notification (NOPERM on the channel)
  -- is a status (2), not an error that would blame -- and retry -- this key
  local sent = redis.pcall('PUBLISH', ARGV[4], ARGV[5])
  if type(sent) == 'table' and sent['err'] then return 2 end
end
return 1
"""

#: reasons of ``stream_redis_write_errors_total``: why one key's write failed (closed set)
WRITE_ERROR_REASONS: Final = (
    "wrong_type",  # the key holds another Redis type (script status -1, or WRONGTYPE)
    "bad_seq",  # the stored document of this lineage has no numeric seq (status -2)
    "no_permission",  # NOPERM: the ACL user may not write this key
    # the documents were written but PUBLISH was refused (the ACL user may not publish on
    # the notification channel): one count per flush that met it, not one per key
    "publish_refused",
    "script_error",  # the guard script failed on this key
    "error_reply",  # any other error reply about this command
    "unexpected_reply",  # a reply that is not an error but not one we know either
)

#: error-reply codes about the server, not about one key: like a lost connection, the
#: whole batch stays pending and is retried with backoff (nothing is dropped)
SERVER_ERROR_CODES: Final = frozenset(
    {
        "OOM",
        "READONLY",
        "MASTERDOWN",
        "LOADING",
        "BUSY",
        "MISCONF",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "NOREPLICAS",
        "NOAUTH",
        "WRONGPASS",
        "MOVED",
        "ASK",
        "EXECABORT",
        "NOSCRIPT",
    }
)

_CODE_OF_CLASS: Final = (
    (NoPermissionError, "NOPERM"),
    (NoScriptError, "NOSCRIPT"),
    # not in types-redis' stubs; redis-py has it since 4.x
    (getattr(redis.exceptions, "OutOfMemoryError", ReadOnlyError), "OOM"),
    (ReadOnlyError, "READONLY"),
    (ExecAbortError, "EXECABORT"),
    # redis-py's cluster client maps these replies to classes too (Redis Cluster)
    (redis.exceptions.ClusterDownError, "CLUSTERDOWN"),
    (redis.exceptions.TryAgainError, "TRYAGAIN"),
    (redis.exceptions.MovedError, "MOVED"),
    (redis.exceptions.AskError, "ASK"),
)


def error_code(reply: BaseException) -> str:
    """The code an error reply starts with (``WRONGTYPE``, ``NOPERM``, ``ERR``, ...).

    redis-py strips the code from the message of the errors it maps to a class, and
    versions before 8 do not keep it: the class says it then.

    >>> error_code(ResponseError("WRONGTYPE Operation against a key holding the wrong kind"))
    'WRONGTYPE'
    >>> error_code(NoPermissionError("this user has no permissions to access one of the keys"))
    'NOPERM'
    """
    code = getattr(reply, "status_code", None)
    if code:
        return str(code)
    for cls, name in _CODE_OF_CLASS:
        if isinstance(reply, cls):
            return name
    first = str(reply).split(" ", 1)[0]
    return first if first.isupper() and first.isalpha() else "ERR"


def is_server_error(reply: Any) -> bool:
    """Whether ``reply`` is an error reply about the server as a whole (out of memory, a
    read-only replica, loading, ...): then no key is to blame and the batch is retried."""
    return isinstance(reply, ResponseError) and error_code(reply) in SERVER_ERROR_CODES


def write_error_reason(reply: Any, *, guarded: bool) -> str | None:
    """Why one command of a flush failed for its key (one of :data:`WRITE_ERROR_REASONS`),
    or None if it did its job. ``guarded`` for a :data:`WRITE_SCRIPT` reply, else the
    reply of a plain ``SET`` or ``DEL``. Server errors (:func:`is_server_error`) are
    decided before this is asked.

    >>> write_error_reason(1, guarded=True), write_error_reason(0, guarded=True)
    (None, None)
    >>> write_error_reason(WRONG_TYPE, guarded=True), write_error_reason(BAD_SEQ, guarded=True)
    ('wrong_type', 'bad_seq')
    >>> write_error_reason(ResponseError("WRONGTYPE Operation against a key"), guarded=False)
    'wrong_type'
    >>> write_error_reason(b"OK", guarded=False), write_error_reason(1, guarded=False)
    (None, None)
    """
    if isinstance(reply, BaseException):
        code = error_code(reply)
        if code == "WRONGTYPE":
            return "wrong_type"
        if code == "NOPERM":
            return "no_permission"
        text = str(reply)
        if "user_script" in text or "script:" in text or "Error running script" in text:
            return "script_error"
        return "error_reply"
    if type(reply) is int:  # not bool: a SET with a callback would give True
        if guarded:
            if reply in (WRITTEN, STALE, NOT_NOTIFIED):
                return None
            return {WRONG_TYPE: "wrong_type", BAD_SEQ: "bad_seq"}.get(reply, "unexpected_reply")
        return None if reply >= 0 else "unexpected_reply"  # DEL: how many keys it removed
    if not guarded and reply in (b"OK", "OK", True):
        return None
    return "unexpected_reply"


#: the most packed extra commands (track catalogue writes) a writer keeps while Redis is down
MAX_COMMANDS: Final = 200_000


FlushCallback = Callable[[list[PendingWrite], list[int], float], None]
ErrorCallback = Callable[[Exception, float], None]
#: (kind, reason, dropped): one key's command failed; kind is "doc" (a listener's guarded
#: document), "plain" (e.g. a similar list) or "del"; dropped once it is given up
KeyErrorCallback = Callable[[str, str, bool], None]


@dataclass(slots=True)
class _KeyFailure:
    attempts: int
    retry_at: float


class WriterDied(RuntimeError):
    """The writer's flusher task ended while the writer was not stopping (see
    :meth:`RecoWriter.watch`)."""


class RecoWriter:
    """Coalescing, pipelined, retrying writer of recommendation documents.

    ``submit`` never blocks on Redis: it replaces any pending document of the same user
    (a newer ``seq`` wins) and wakes the flusher. The flusher sends up to ``max_batch``
    documents per pipeline round trip.

    Each reply is checked on its own. When Redis is unreachable (a connection error, a
    timeout) or answers about itself (out of memory, read-only, loading, ...: see
    :data:`SERVER_ERROR_CODES`), the whole batch stays pending and is retried with
    exponential backoff (capped at ``retry_max_s``); nothing is dropped. When one key
    fails (a key of another type, a stored document without a numeric seq, an ACL
    refusal, a script error: :func:`write_error_reason`), the rest of the batch is
    written; that key alone is retried after ``key_retry_s``, doubling, and dropped after
    ``key_attempts`` failed attempts in a row (``on_key_error`` hears of each failure).
    The key is left as it is: the writer never deletes what it cannot read.
    """

    def __init__(
        self,
        client: aioredis.Redis[Any],
        *,
        ttl_s: int,
        channel: str,
        flush_interval_ms: float = 2.0,
        max_batch: int = 512,
        retry_max_s: float = 5.0,
        on_flush: FlushCallback | None = None,
        on_error: ErrorCallback | None = None,
        on_key_error: KeyErrorCallback | None = None,
        key_attempts: int = 3,
        key_retry_s: float = 0.1,
    ) -> None:
        if key_attempts < 1:
            raise ValueError(f"key_attempts must be >= 1, got {key_attempts}")
        self.client = client
        self.ttl_s = ttl_s
        self.channel = channel
        self.flush_interval_s = flush_interval_ms / 1000.0
        self.max_batch = max_batch
        self.retry_max_s = retry_max_s
        self.on_flush = on_flush
        self.on_error = on_error
        self.pending: dict[str, PendingWrite] = {}
        self.deletes: set[str] = set()
        #: unguarded documents (key -> JSON), e.g. per-track "more like this" lists
        self.plain: dict[str, bytes] = {}
        #: other packed commands (the track catalogue's HSETs/HINCRBYs), sent in order;
        #: at most MAX_COMMANDS wait (a long Redis outage drops the oldest, counted here)
        self.commands: list[bytes] = []
        self.dropped_commands = 0
        #: how many commands the cap has trimmed from the front of ``commands``, ever (a
        #: flush in flight then removes only its own commands that are still queued)
        self.trimmed_commands = 0
        #: flushes in which PUBLISH was refused (documents written, not notified)
        self.publish_refused = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        #: set while no flush round trip is in flight (see ready)
        self._ready = asyncio.Event()
        self._ready.set()
        self._task: asyncio.Task[None] | None = None
        self._sha: str | None = None
        self._stopping = False
        self.consecutive_failures = 0
        self.on_key_error = on_key_error
        self.key_attempts = key_attempts
        self.key_retry_s = key_retry_s
        #: (kind, key) -> failed attempts in a row and when to try again; only for queued keys
        self._failures: dict[tuple[str, str], _KeyFailure] = {}
        #: writes given up after key_attempts failures (logged at a bounded rate)
        self.dropped_total = 0

    def submit(self, write: PendingWrite) -> None:
        old = self.pending.get(write.key)
        if old is None or old.seq <= write.seq:
            self.pending[write.key] = write
        self._idle.clear()
        self._wake.set()

    def submit_plain(self, key: str, doc: bytes) -> None:
        """Write ``doc`` at ``key`` with the TTL on the next flush (last writer wins)."""
        self.plain[key] = doc
        self._idle.clear()
        self._wake.set()

    def submit_commands(self, commands: Sequence[bytes]) -> None:
        """Send these packed commands (:func:`pack_command`) with the next flush. A flush
        that fails is retried whole, so a command may be applied twice: use idempotent
        commands, or accept that (the catalogue's play counts do)."""
        if commands:
            self.commands.extend(commands)
            excess = len(self.commands) - MAX_COMMANDS
            if excess > 0:  # derived, cosmetic data: bounded memory wins over completeness
                del self.commands[:excess]
                self.trimmed_commands += excess
                if not self.dropped_commands:
                    logger.warning("Redis unreachable: dropping the oldest catalogue writes")
                self.dropped_commands += excess
            self._idle.clear()
            self._wake.set()

    async def ready(self) -> None:
        """Return once no flush round trip is in flight: a producer that waits for this
        before handing over a batch gets its writes into one flush, not many."""
        await self._ready.wait()

    async def _load_script(self) -> str:
        client: Any = self.client  # types-redis leaves script_load untyped
        sha: str = await client.script_load(WRITE_SCRIPT)
        return sha

    def _busy(self) -> bool:
        return bool(self.pending or self.deletes or self.plain or self.commands)

    def forget(self, key: str) -> None:
        """Delete ``key`` (a forgotten listener): drops any pending write for it, and the DEL
        is sent before writes in the next flush."""
        self.pending.pop(key, None)
        self._failures.pop(("doc", key), None)
        self.deletes.add(key)
        self._idle.clear()
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="reco-writer")

    async def watch(self) -> None:
        """Wait while the flusher runs. Returns once it was stopped (:meth:`stop`) or
        cancelled; raises :class:`WriterDied` if it ended any other way (an exception, or a
        return while not stopping): writes queued after that would never reach Redis, so
        the caller (the worker's lifecycle, a supervised task) must not carry on without
        it. Cancelling the watch leaves the flusher alone."""
        task = self._task
        if task is None:
            raise WriterDied("the Redis writer was never started")
        await asyncio.wait({task})
        if task.cancelled() or self._stopping:
            return
        exc = task.exception()
        raise WriterDied(
            f"the Redis writer's flusher ended unexpectedly with {len(self.pending)} "
            f"document(s) queued" + (f": {exc!r}" if exc is not None else "")
        ) from exc

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Flush what is pending (bounded by ``drain_timeout``), then stop."""
        try:
            await asyncio.wait_for(self.drained(), drain_timeout)
        except TimeoutError:
            logger.warning("stopping with %d recommendation writes unflushed", len(self.pending))
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def drained(self) -> None:
        """Wait until nothing is pending."""
        while self._busy():
            self._wake.set()
            self._idle.clear()
            await self._idle.wait()

    async def _run(self) -> None:
        while not self._stopping:
            retry_in = self._next_retry_in(time.monotonic())
            if retry_in is None:
                await self._wake.wait()
            elif retry_in > 0:  # only keys waiting for their retry time: sleep until then
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), retry_in)
            self._wake.clear()
            if self.flush_interval_s:
                # let a burst accumulate so one round trip carries many users
                await asyncio.sleep(self.flush_interval_s)
            self._ready.clear()
            try:
                while self._has_due(time.monotonic()):
                    ok = await self.flush_once()
                    if not ok:
                        backoff = min(self.retry_max_s,
                                      0.05 * 2 ** min(self.consecutive_failures, 10))
                        await asyncio.sleep(backoff)
            finally:
                self._ready.set()
            if self._next_retry_in(time.monotonic()) is None:
                self._idle.set()

    def _queued(self, kind: str, key: str) -> bool:
        if kind == "doc":
            return key in self.pending
        if kind == "plain":
            return key in self.plain
        return key in self.deletes

    def _next_retry_in(self, now: float) -> float | None:
        """Seconds until the earliest queued key waiting for a retry (0 if one is due now),
        or None if none waits; forgets failures of keys no longer queued."""
        earliest: float | None = None
        for (kind, key), failure in list(self._failures.items()):
            if not self._queued(kind, key):
                del self._failures[(kind, key)]
            elif earliest is None or failure.retry_at < earliest:
                earliest = failure.retry_at
        return None if earliest is None else max(0.0, earliest - now)

    def _due(self, kind: str, key: str, now: float) -> bool:
        failure = self._failures.get((kind, key))
        return failure is None or failure.retry_at <= now

    def _has_due(self, now: float) -> bool:
        if not self._failures:
            return bool(self.pending or self.deletes or self.plain or self.commands)
        return (
            bool(self.commands)
            or any(self._due("doc", k, now) for k in self.pending)
            or any(self._due("del", k, now) for k in self.deletes)
            or any(self._due("plain", k, now) for k in self.plain)
        )

    def _take(self, kind: str, keys: Iterable[str], now: float, limit: int | None) -> list[str]:
        """Up to ``limit`` of ``keys`` that are not waiting for a retry."""
        if self._failures:
            keys = (k for k in keys if self._due(kind, k, now))
        return list(itertools.islice(keys, limit))

    async def flush_once(self) -> bool:
        """Send one batch. Returns False (and keeps the batch pending) when Redis is
        unreachable or answers with a server error; True when the round trip went
        through, even if some keys failed (each is then retried or dropped on its own)."""
        now = time.monotonic()
        keys = self._take("doc", self.pending, now, self.max_batch)
        batch = [self.pending[k] for k in keys]
        deletes = self._take("del", self.deletes, now, None)
        plain = {k: self.plain[k] for k in self._take("plain", self.plain, now, self.max_batch)}
        commands = self.commands[: 4 * self.max_batch]
        trimmed_before = self.trimmed_commands
        started = time.perf_counter()
        try:
            replies = await self._send(batch, deletes, plain, commands)
        except (RedisError, OSError, redis.exceptions.RedisClusterException) as exc:
            self.consecutive_failures += 1
            if self.consecutive_failures in (1, 10) or self.consecutive_failures % 100 == 0:
                logger.warning(
                    "redis flush of %d writes failed (%s: %s); attempt %d, retrying with backoff",
                    len(batch),
                    type(exc).__name__,
                    exc,
                    self.consecutive_failures,
                )
            if self.on_error is not None:
                self.on_error(exc, time.perf_counter() - started)
            return False
        if self.consecutive_failures:
            logger.info("redis is back after %d failed flushes", self.consecutive_failures)
        self.consecutive_failures = 0
        now = time.monotonic()
        del_replies = replies[: len(deletes)]
        plain_replies = replies[len(deletes) : len(deletes) + len(plain)]
        command_replies = replies[len(deletes) + len(plain) : len(deletes) + len(plain) +
                                  len(commands)]
        doc_replies = replies[len(deletes) + len(plain) + len(commands) :]
        failures = self._failures
        for key, reply in zip(deletes, del_replies, strict=True):
            reason = write_error_reason(reply, guarded=False)
            if reason is None:
                failures.pop(("del", key), None)
            if reason is None or self._failed("del", key, reason, reply, now):
                self.deletes.discard(key)
        for (key, doc), reply in zip(plain.items(), plain_replies, strict=True):
            reason = write_error_reason(reply, guarded=False)
            if reason is None and failures:
                failures.pop(("plain", key), None)
            if (reason is None or self._failed("plain", key, reason, reply, now)) and (
                self.plain.get(key) is doc
            ):
                del self.plain[key]
        # catalogue writes are cosmetic and mostly not idempotent (HINCRBY): one that
        # failed for its key is counted and dropped, never retried
        # the cap may have trimmed some of the sent commands from the queue's front while
        # the flush was in flight (submit_commands): remove only those still queued, never
        # commands queued after them
        del self.commands[: max(0, len(commands) - (self.trimmed_commands - trimmed_before))]
        for reply in command_replies:
            reason = write_error_reason(reply, guarded=False)
            if reason is not None:
                self.dropped_commands += 1
                if self.on_key_error is not None:
                    self.on_key_error("catalog", reason, True)
        done: list[PendingWrite] = []
        results: list[int] = []
        not_notified = 0
        for write, reply in zip(batch, doc_replies, strict=True):
            reason = write_error_reason(reply, guarded=True)
            if reason is None:
                done.append(write)
                if reply == NOT_NOTIFIED:
                    not_notified += 1
                    reply = WRITTEN
                results.append(int(reply))
                if failures:
                    failures.pop(("doc", write.key), None)
            elif not self._failed("doc", write.key, reason, reply, now):
                continue  # stays pending for its retry
            # only drop it if no newer document for that user arrived during the flush
            if self.pending.get(write.key) is write:
                del self.pending[write.key]
        if not_notified:
            self._publish_refused(not_notified)
        if self.on_flush is not None:
            self.on_flush(done, results, time.perf_counter() - started)
        return True

    def _publish_refused(self, documents: int) -> None:
        """PUBLISH on the notification channel was refused in this flush: the documents
        were written (readers polling see them), subscribers were not told. About the
        server's configuration (an ACL without the channel), not any key: counted once per
        flush as ``publish_refused`` and logged at a bounded rate."""
        self.publish_refused += 1
        if self.publish_refused in (1, 10) or self.publish_refused % 1000 == 0:
            logger.warning(
                "Redis refused PUBLISH on channel %r (%d flush(es) so far; %d document(s) "
                "in this one written without a notification): does the ACL user have the "
                "channel (&%s)?", self.channel, self.publish_refused, documents, self.channel,
            )
        if self.on_key_error is not None:
            self.on_key_error("publish", "publish_refused", False)

    def _failed(self, kind: str, key: str, reason: str, reply: Any, now: float) -> bool:
        """Count one key's failed attempt; True if it is now given up (dropped)."""
        failure = self._failures.pop((kind, key), None)
        attempts = 1 if failure is None else failure.attempts + 1
        dropped = attempts >= self.key_attempts
        if not dropped:
            delay = min(self.retry_max_s, self.key_retry_s * 2 ** (attempts - 1))
            self._failures[(kind, key)] = _KeyFailure(attempts, now + delay)
        else:
            self.dropped_total += 1
            if self.dropped_total <= 10 or self.dropped_total % 1000 == 0:
                logger.warning(
                    "dropped the %s write to Redis key %r after %d failed attempts (%s: %.200s);"
                    " the key is left as it is; %d writes dropped so far",
                    kind,
                    key,
                    attempts,
                    reason,
                    str(reply),
                    self.dropped_total,
                )
        if self.on_key_error is not None:
            self.on_key_error(kind, reason, dropped)
        return dropped

    async def _send(
        self,
        batch: list[PendingWrite],
        deletes: list[str],
        plain: dict[str, bytes] | None = None,
        commands: Sequence[bytes] = (),
    ) -> list[Any]:
        """One round trip: DELs, plain SETs, then one guarded write per document; returns
        every command's reply in that order (an error reply as its exception object).

        The commands are packed here (:func:`pack_command`) and their replies read back on
        one pooled connection: redis-py's pipeline packed and parsed each command in Python
        at ~50-95 us of CPU per document (py-spy: 6.5 % of the worker), this costs a few.
        A connection error drops the connection, so no reply is left unread, and a server
        error reply (:func:`is_server_error`) is raised: the caller retries the whole batch
        (the ``seq`` guard makes writes idempotent). Other error replies are about one key
        and come back in place."""
        plain = plain or {}
        if self._sha is None:
            self._sha = await self._load_script()
        cluster = isinstance(self.client, aioredis.RedisCluster)
        for attempt in range(2):
            parts: list[bytes] = []
            for key in deletes if not cluster else ():
                parts.append(pack_command(b"DEL", key))
            for key, doc in plain.items() if not cluster else ():
                parts.append(pack_command(b"SET", key, doc, b"EX", self.ttl_s))
            if not cluster:
                parts.extend(commands)
            if not cluster:
                pack = GuardedWritePacker(self._sha, self.ttl_s, self.channel)
                parts.extend([pack(w) for w in batch])
            if isinstance(self.client, aioredis.RedisCluster):
                replies = await self._cluster_round_trip(batch, deletes, plain, commands)
            else:
                replies = await self._round_trip(parts)
            if any(isinstance(r, NoScriptError) for r in replies):
                # Redis restarted and lost its script cache: load it and send the batch again
                self._sha = await self._load_script()
                if attempt:
                    raise next(r for r in replies if isinstance(r, NoScriptError))
                continue
            for r in replies:
                # in place from the cluster pipeline: a node it could not reach (connection
                # error, timeout, uncovered slot during a failover) is no key's fault either
                if is_server_error(r) or (
                    isinstance(r, BaseException) and not isinstance(r, ResponseError)
                ):
                    raise r
            return replies
        raise AssertionError("unreachable")

    def _guarded_write(self, w: PendingWrite) -> tuple[str | int | bytes, ...]:
        """EVALSHA's arguments (after the command name) for one guarded document write:
        the script, its one key, then seq, document, TTL, channel, notification, lineage."""
        if self._sha is None:
            raise AssertionError("the write script is not loaded")
        return (self._sha, 1, w.key, w.seq, w.doc, self.ttl_s, self.channel, w.notification,
                w.lineage)

    async def _cluster_round_trip(
        self,
        batch: list[PendingWrite],
        deletes: list[str],
        plain: dict[str, bytes],
        commands: Sequence[bytes] = (),
    ) -> list[Any]:
        """The same commands as :meth:`_send` packs, through redis-py's cluster pipeline:
        it groups them by the node owning each key's slot (one round trip per node, in
        parallel), follows MOVED/ASK (and refreshes its slot map), and retries a node it
        lost after refreshing the topology (a failover). Every command names one key, so
        none is ever CROSSSLOT. Error replies come back in place, as from
        :meth:`_round_trip`; a node that stays unreachable raises (the batch is retried,
        and the ``seq`` guard makes the commands that did land idempotent)."""
        pipe = cast(Any, self.client).pipeline(transaction=False)
        for key in deletes:
            pipe.execute_command("DEL", key)
        for key, doc in plain.items():
            pipe.execute_command("SET", key, doc, "EX", self.ttl_s)
        for packed in commands:  # one key each (the catalogue's), routed by it
            name, *args = unpack_command(packed)
            pipe.execute_command(name.decode(), *args)  # redis-py wants the name as str
        for w in batch:
            pipe.execute_command("EVALSHA", *self._guarded_write(w))
        replies = await pipe.execute(raise_on_error=False)
        # redis-py's callbacks turn SET/EXPIRE/HSETNX replies into bools: back to what the
        # server said (1/0, as the packer path reads them) for write_error_reason
        return [int(r) if isinstance(r, bool) else r for r in replies]

    async def _round_trip(self, commands: list[bytes]) -> list[Any]:
        """Send packed ``commands`` on one pooled connection and read one reply each (error
        replies come back as exception objects, in place): :func:`round_trip`."""
        return await round_trip(self.client, commands)


async def round_trip(client: Any, commands: list[bytes]) -> list[Any]:
    """Send packed ``commands`` (:func:`pack_command`) on one pooled connection of a
    (non-cluster) async ``client`` and read one reply each, without redis-py's callbacks
    (error replies come back as exception objects, in place)."""
    pool = client.connection_pool
    conn = await pool.get_connection()
    try:
        timeout = pool.connection_kwargs.get("socket_timeout") or None
        await conn.send_packed_command(commands, check_health=False)
        replies: list[Any] = []
        async with asyncio.timeout(timeout):  # one deadline for the whole batch
            for _ in commands:
                try:
                    replies.append(
                        await conn.read_response(timeout=math.inf, disconnect_on_error=True)
                    )
                except ResponseError as exc:  # an error reply: the stream is in sync
                    replies.append(exc)
        return replies
    except TimeoutError:
        await conn.disconnect(nowait=True)
        raise RedisTimeoutError(
            f"Redis did not answer {len(commands)} commands in time"
        ) from None
    except BaseException:
        await conn.disconnect(nowait=True)  # replies may be left unread: start afresh
        raise
    finally:
        await pool.release(conn)


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(data), data)


class GuardedWritePacker:
    """Packs one guarded document write (EVALSHA with :meth:`RecoWriter._guarded_write`'s
    arguments) into the same bytes as ``pack_command(b"EVALSHA", *args)``, with the
    arguments that are the same for every write of a flush (the command, the script, the
    key count, the TTL and the channel) packed once: one format per write instead of ten
    conversions (~2.6 -> ~0.8 us per document). A write whose fields are not exactly
    ``str`` / ``int`` / ``bytes`` (``PendingWrite``'s types) goes through
    :func:`pack_command`."""

    __slots__ = ("sha", "ttl_s", "channel", "head", "middle")

    def __init__(self, sha: str, ttl_s: int, channel: str) -> None:
        self.sha, self.ttl_s, self.channel = sha, ttl_s, channel
        self.head = pack_command(b"EVALSHA", sha, 1)[len(b"*3\r\n"):]
        self.middle = pack_command(ttl_s, channel)[len(b"*2\r\n"):]

    def __call__(self, w: PendingWrite) -> bytes:
        key, seq, doc, note, lineage = w.key, w.seq, w.doc, w.notification, w.lineage
        if (type(key) is not str or type(seq) is not int or type(doc) is not bytes
                or type(note) is not bytes or type(lineage) is not str):
            return pack_command(b"EVALSHA", self.sha, 1, key, seq, doc, self.ttl_s,
                                self.channel, note, lineage)
        k, s, g = key.encode(), b"%d" % seq, lineage.encode()
        return b"*10\r\n%b$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n%b$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
            self.head, len(k), k, len(s), s, len(doc), doc, self.middle, len(note), note,
            len(g), g)


def unpack_command(packed: bytes) -> list[bytes]:
    """The arguments of one :func:`pack_command` (for redis-py's cluster pipeline, which
    routes a command by its key).

    >>> unpack_command(pack_command(b"HINCRBY", "track:t1", b"plays", 3))
    [b'HINCRBY', b'track:t1', b'plays', b'3']
    """
    if not packed.startswith(b"*"):
        raise ValueError("not a packed command")
    head, _, rest = packed.partition(b"\r\n")
    args: list[bytes] = []
    view = memoryview(rest)
    pos = 0
    for _ in range(int(head[1:])):
        end = rest.index(b"\r\n", pos)
        if rest[pos : pos + 1] != b"$":
            raise ValueError("not a packed command")
        length = int(rest[pos + 1 : end])
        args.append(bytes(view[end + 2 : end + 2 + length]))
        pos = end + 2 + length + 2
    return args


def pack_command(*args: bytes | str | int) -> bytes:
    """One command in the Redis protocol (RESP), as redis-py's packer would produce it.

    >>> pack_command(b"SET", "reco:u1", b"{}", b"EX", 60)
    b'*5\\r\\n$3\\r\\nSET\\r\\n$7\\r\\nreco:u1\\r\\n$2\\r\\n{}\\r\\n$2\\r\\nEX\\r\\n$2\\r\\n60\\r\\n'
    """
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = b"%d" % a
        out.append(_bulk(a))
    return b"".join(out)


def client_options(
    url: str,
    *,
    password: str = "",
    username: str = "",
    tls_ca_file: str = "",
    tls_cert_file: str = "",
    tls_key_file: str = "",
) -> tuple[str, dict[str, Any]]:
    """The URL and redis-py keyword arguments for these credentials and TLS files.

    Any TLS file implies TLS (``redis://`` is upgraded to ``rediss://``); with a CA file the
    server certificate is verified against it, else against the system trust store.

    >>> client_options("redis://127.0.0.1:6379/0", username="app", password="pw")
    ('redis://127.0.0.1:6379/0', {'password': 'pw', 'username': 'app'})
    """
    kwargs: dict[str, Any] = {}
    if password:
        kwargs["password"] = password
    if username:
        kwargs["username"] = username
    if tls_ca_file or tls_cert_file or tls_key_file:
        if url.startswith("redis://"):
            url = "rediss://" + url[len("redis://") :]
        if tls_ca_file:
            kwargs["ssl_ca_certs"] = tls_ca_file
        if tls_cert_file:
            kwargs["ssl_certfile"] = tls_cert_file
            kwargs["ssl_keyfile"] = tls_key_file
    return url, kwargs


def connect_async(
    url: str, password: str = "", *, cluster: bool = False, **auth: str
) -> aioredis.Redis[Any]:
    """The worker's Redis client (``auth``: :func:`client_options`' username and TLS
    files): redis-py's cluster client when ``cluster`` or a ``redis+cluster://`` URL says
    so (:func:`cluster_url`). It answers the same commands; typed as ``Redis`` because
    types-redis' stubs give ``RedisCluster`` few of them."""
    url, cluster = cluster_url(url, cluster)
    url, kwargs = client_options(url, password=password, **auth)
    if cluster:
        return cast(
            "aioredis.Redis[Any]",
            aioredis.RedisCluster.from_url(
                url, socket_timeout=5, socket_connect_timeout=5, **kwargs
            ),
        )
    return aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, **kwargs)


def cluster_url(url: str, cluster: bool = False) -> tuple[str, bool]:
    """The URL redis-py understands and whether it is a Redis Cluster: ``redis+cluster://``
    and ``rediss+cluster://`` select cluster mode (as does ``cluster``, the setting
    ``redis_cluster``); the node in the URL is only the seed the topology is read from.

    >>> cluster_url("redis+cluster://127.0.0.1:7000/0")
    ('redis://127.0.0.1:7000/0', True)
    >>> cluster_url("redis://127.0.0.1:7000/0", True), cluster_url("redis://h:6379/0")
    (('redis://127.0.0.1:7000/0', True), ('redis://h:6379/0', False))
    """
    for scheme in ("redis", "rediss"):
        prefix = f"{scheme}+cluster://"
        if url.startswith(prefix):
            return f"{scheme}://{url[len(prefix) :]}", True
    return url, cluster


def check_redis_mode(url: str, password: str = "", **auth: Any) -> bool | None:
    """Whether the server at ``url`` agrees with the configured mode: raises ConfigError
    (naming the setting ``redis_cluster``) when a cluster client meets a standalone server
    or a standalone client meets a cluster node; None when the server does not answer
    (the writer retries until it does), else the server's ``cluster_enabled``."""
    url, cluster = cluster_url(url, bool(auth.pop("cluster", False)))
    url, kwargs = client_options(url, password=password, **auth)
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, **kwargs)
    try:
        enabled = bool(int(client.info("cluster").get("cluster_enabled", 0)))
    except (RedisError, OSError, ValueError) as exc:
        logger.warning("could not ask Redis whether it is a cluster (%s); not checked", exc)
        return None
    finally:
        client.close()
    if enabled and not cluster:
        raise ConfigError(
            "setting 'redis_cluster' (env STREAM_REDIS_CLUSTER): the Redis server at "
            "redis_url is a Redis Cluster node; set redis_cluster=true or use a "
            "redis+cluster:// URL"
        )
    if cluster and not enabled:
        raise ConfigError(
            "setting 'redis_cluster' (env STREAM_REDIS_CLUSTER): redis_url asks for Redis "
            "Cluster but the server there is standalone (cluster_enabled:0); set "
            "redis_cluster=false and use a redis:// URL"
        )
    return enabled


def connect_sync(
    url: str, password: str = "", *, cluster: bool = False, **auth: Any
) -> redis.Redis[Any]:
    """A blocking client (readers, start-up): the cluster one when the mode says so
    (typed as ``Redis``, as :func:`connect_async`)."""
    timeouts: dict[str, Any] = {
        k: auth.pop(k) for k in ("socket_timeout", "socket_connect_timeout") if k in auth
    }
    url, cluster = cluster_url(url, cluster)
    url, kwargs = client_options(url, password=password, **cast(dict[str, str], auth))
    kwargs.update(timeouts)
    if cluster:
        return cast("redis.Redis[Any]", redis.RedisCluster.from_url(url, **kwargs))
    return redis.Redis.from_url(url, **kwargs)


# --------------------------------------------------------------------------- track catalogue


def catalog_commands(
    prefix: str,
    changes: dict[str, tuple[int | None, Any]],
    counts: dict[str, tuple[int, int]],
    ttl_s: int,
) -> list[bytes]:
    """Packed commands that bring the ``{prefix}{track_id}`` hashes up to date: names
    (HSET, only the parts known) and ``first_seen`` (HSETNX: the earliest writer wins) for
    ``changes`` (track -> (first-seen ms or None, names with name/artist/album)),
    ``plays`` (HINCRBY) and ``last_seen`` for ``counts`` (track -> (plays, last ms)); each
    touched hash's expiry is renewed to ``ttl_s``.

    >>> catalog_commands("track:", {}, {"t1": (3, 1000)}, 60)[0]
    b'*4\\r\\n$7\\r\\nHINCRBY\\r\\n$8\\r\\ntrack:t1\\r\\n$5\\r\\nplays\\r\\n$1\\r\\n3\\r\\n'
    """
    out: list[bytes] = []
    for track, (first_ms, info) in changes.items():
        key = f"{prefix}{track}"
        fields: list[bytes | str | int] = []
        for name in ("name", "artist", "album"):
            value = getattr(info, name, None)
            if value is not None:
                fields += [name, value]
        if fields:
            out.append(pack_command(b"HSET", key, *fields))
        if first_ms is not None:
            out.append(pack_command(b"HSETNX", key, b"first_seen", first_ms))
        if track not in counts:
            out.append(pack_command(b"EXPIRE", key, ttl_s))
    # the counts' three commands per track, with their constant parts packed once: the
    # bytes of pack_command (~1.5 us a command; this timer's flush packs every track played
    # since the last one); counts not ints (never from TrackCatalog) go through pack_command
    hincrby = b"*4\r\n" + _packed_arg(b"HINCRBY")
    plays_field = _packed_arg(b"plays")
    hset = b"*4\r\n" + _packed_arg(b"HSET")
    last_field = _packed_arg(b"last_seen")
    expire = b"*3\r\n" + _packed_arg(b"EXPIRE")
    ttl = _packed_arg(ttl_s)
    append = out.append
    for track, (plays, last_ms) in counts.items():
        key = f"{prefix}{track}"
        if type(plays) is not int or type(last_ms) is not int:
            append(pack_command(b"HINCRBY", key, b"plays", plays))
            append(pack_command(b"HSET", key, b"last_seen", last_ms))
            append(pack_command(b"EXPIRE", key, ttl_s))
            continue
        k = key.encode()
        packed_key = b"$%d\r\n%b\r\n" % (len(k), k)
        n, last = b"%d" % plays, b"%d" % last_ms
        append(b"%b%b%b$%d\r\n%b\r\n" % (hincrby, packed_key, plays_field, len(n), n))
        append(b"%b%b%b$%d\r\n%b\r\n" % (hset, packed_key, last_field, len(last), last))
        append(expire + packed_key + ttl)
    return out


def _packed_arg(arg: bytes | str | int) -> bytes:
    """One argument as :func:`pack_command` packs it (a bulk string)."""
    return pack_command(arg)[len(b"*1\r\n"):]


def decode_track(raw: dict[Any, Any] | list[Any] | None) -> dict[str, str]:
    """A ``track:`` hash as str -> str, keeping only text that is valid UTF-8."""
    out: dict[str, str] = {}
    if isinstance(raw, dict):
        for k, v in raw.items():
            try:
                key = k.decode() if isinstance(k, bytes) else str(k)
                out[key] = v.decode() if isinstance(v, bytes) else str(v)
            except UnicodeDecodeError:
                continue
    return out


async def read_track_names(
    client: Any, prefix: str, track_ids: Sequence[str]
) -> dict[str, tuple[str | None, str | None, str | None]]:
    """name/artist/album of each of ``track_ids`` from the catalogue (None where unknown;
    tracks without a hash are left out). Values are cut to the event limit (256)."""
    if not track_ids:
        return {}
    if isinstance(client, aioredis.RedisCluster):
        async with cast(Any, client).pipeline(transaction=False) as pipe:
            for track in track_ids:
                pipe.hmget(f"{prefix}{track}", "name", "artist", "album")
            replies = await pipe.execute()
    else:  # packed here: redis-py's pipeline packs and parses each command in Python
        replies = await round_trip(client, [
            pack_command(b"HMGET", f"{prefix}{track}", b"name", b"artist", b"album")
            for track in track_ids
        ])
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
    out: dict[str, tuple[str | None, str | None, str | None]] = {}
    for track, values in zip(track_ids, replies, strict=True):
        if not values or all(v is None for v in values):
            continue
        parts: list[str | None] = []
        for v in values:
            text = v.decode("utf-8", "replace") if isinstance(v, bytes) else None
            parts.append(text[:256] if text else None)
        out[track] = (parts[0], parts[1], parts[2])
    return out


# --------------------------------------------------------------------------- client side


class RecoReader:
    """The small client for services that read recommendations.

    >>> reader = RecoReader("redis://127.0.0.1:6379/0")        # doctest: +SKIP
    >>> doc = reader.get("u42")                                 # doctest: +SKIP
    >>> [(i.track_id, i.reason) for i in doc.items]             # doctest: +SKIP
    [('t17', 'because you played t9'), ...]
    >>> for note in reader.updates(timeout_s=5): print(note)    # doctest: +SKIP
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        password: str = "",
        prefix: str = "reco:",
        similar_prefix: str = "similar:",
        channel: str = "reco-updates",
        username: str = "",
        tls_ca_file: str = "",
        tls_cert_file: str = "",
        tls_key_file: str = "",
        cluster: bool = False,
        catalog_prefix: str = "track:",
    ) -> None:
        self.cluster = cluster_url(url, cluster)[1]
        try:
            self.client = connect_sync(
                url,
                password,
                cluster=self.cluster,
                username=username,
                tls_ca_file=tls_ca_file,
                tls_cert_file=tls_cert_file,
                tls_key_file=tls_key_file,
                socket_timeout=5,
            )
        except redis.exceptions.RedisClusterException as exc:
            if "not enabled" in str(exc):
                raise ConfigError(
                    "setting 'redis_cluster': redis_url asks for Redis Cluster but the "
                    "server there is standalone; use a redis:// URL"
                ) from exc
            raise
        self.prefix = prefix
        self.similar_prefix = similar_prefix
        self.channel = channel
        self.catalog_prefix = catalog_prefix

    def get(self, user_id: str) -> RecoDocument | None:
        raw = self.get_raw(user_id)
        return None if raw is None else RecoDocument.from_json(raw)

    def get_raw(self, user_id: str) -> bytes | None:
        """The stored list document exactly as written (JSON bytes), or None."""
        raw = self.client.get(f"{self.prefix}{user_id}")
        return None if raw is None else bytes(raw)

    def similar(self, track_id: str) -> dict[str, Any] | None:
        raw = self.similar_raw(track_id)
        return None if raw is None else orjson.loads(raw)

    def similar_raw(self, track_id: str) -> bytes | None:
        """The stored "more like this" document exactly as written, or None."""
        raw = self.client.get(f"{self.similar_prefix}{track_id}")
        return None if raw is None else bytes(raw)

    def tracks(self, track_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        """The catalogue hashes (``{catalog_prefix}{track_id}``: name, artist, album,
        first_seen, last_seen, plays) of those of ``track_ids`` that have one."""
        pipe = self.client.pipeline(transaction=False)
        for track in track_ids:
            pipe.hgetall(f"{self.catalog_prefix}{track}")
        out: dict[str, dict[str, str]] = {}
        for track, raw in zip(track_ids, pipe.execute(), strict=True):
            decoded = decode_track(raw)
            if decoded:
                out[track] = decoded
        return out

    def updates(self, timeout_s: float = 10.0) -> Iterator[dict[str, Any]]:
        """Yield update notifications until ``timeout_s`` passes without one.

        On a Redis Cluster the writer's script publishes with classic ``PUBLISH``, which
        the cluster forwards to every node, so the subscription may sit on any node (see
        README "Running on clustered Kafka and Redis Cluster" for why not sharded pub/sub).
        """
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.channel)
        try:
            quiet_until = time.monotonic() + timeout_s
            while time.monotonic() < quiet_until:
                # get_message also returns None for the (ignored) subscribe confirmation,
                # so "None" alone does not mean the channel went quiet
                msg = pubsub.get_message(timeout=max(0.0, quiet_until - time.monotonic()))
                if msg is None or msg.get("type") != "message":
                    continue
                quiet_until = time.monotonic() + timeout_s
                yield orjson.loads(msg["data"])
        finally:
            pubsub.close()

    def close(self) -> None:
        self.client.close()


# --------------------------------------------------------------------------- model checkpoints


def checkpoint_key(app_id: str) -> str:
    return f"model:{app_id}"


class CheckpointTooLarge(RuntimeError):
    """The stored checkpoint is larger than the reader accepts (it was not read)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"checkpoint is {size} bytes, checkpoint_max_bytes is {limit}")
        self.size = size


def load_checkpoint(
    url: str, key: str, password: str = "", *, max_bytes: int = 0, **auth: Any
) -> bytes | None:
    """Read a model checkpoint synchronously (worker start-up, before the event loop).
    With ``max_bytes``, its length is asked first and a larger one is not read
    (:class:`CheckpointTooLarge`). A key of another type raises redis's ResponseError.
    On Redis Cluster (``cluster`` in ``auth`` or a ``redis+cluster://`` URL) through the
    cluster client."""
    client = connect_sync(url, password, socket_timeout=30, socket_connect_timeout=5, **auth)
    try:
        if max_bytes:
            size = int(client.strlen(key))  # type: ignore[no-untyped-call]
            if size > max_bytes:
                raise CheckpointTooLarge(size, max_bytes)
        raw = client.get(key)
    finally:
        client.close()
    return None if raw is None else bytes(raw)


# --------------------------------------------------------------------------- forget tombstones
# A forget reaches the worker that owns the listener, which drops their state at once; but
# the model checkpoint in Redis may be older than the forget, and a worker that lost the
# listener's partition in a rebalance may still hold (and checkpoint) their factors. So each
# forget also leaves a tombstone -- a sorted set of user-id digests scored by the forget's time --
# and every restore drops the tombstoned listeners from the restored models.


def tombstones_key(app_id: str) -> str:
    return f"forgotten:{app_id}"


def tombstone_member(user_id: str) -> str:
    """What a tombstone holds for ``user_id``: a SHA-256 digest (hex, 128 bits), so the
    forgotten listener's id is not kept in clear for the tombstones' lifetime."""
    return hashlib.sha256(b"stream-reco forget\0" + user_id.encode("utf-8")).hexdigest()[:32]


async def add_tombstone(
    client: aioredis.Redis[Any],
    key: str, user_id: str, now_ms: int, ttl_s: float
) -> None:
    """Record a forget of ``user_id`` (as :func:`tombstone_member`), and drop tombstones
    older than ``ttl_s`` (0 keeps them forever)."""
    async with client.pipeline(transaction=True) as tx:
        tx.zadd(key, {tombstone_member(user_id): now_ms})
        if ttl_s:
            tx.zremrangebyscore(key, "-inf", f"({now_ms - int(ttl_s * 1000)}")
        await tx.execute()


async def claim_nonce(
    client: aioredis.Redis,  # type: ignore[type-arg]
    key: str, marker: str, ttl_ms: int,
) -> bytes | None:
    """``SET key marker NX PX ttl_ms GET`` (Redis 7+): None if the key was free and is now
    claimed, else the value already there (stream.processing.control.NonceLedger)."""
    held = await client.set(key, marker, nx=True, px=ttl_ms, get=True)
    return None if held is None else bytes(held)


def load_tombstones(
    url: str, key: str, now_ms: int, ttl_s: float, password: str = "", **auth: Any
) -> dict[str, int]:
    """The tombstones of the listeners forgotten within ``ttl_s`` (0: ever): each
    :func:`tombstone_member` digest with its forget time (epoch ms), synchronously (at
    start-up; the cluster client on Redis Cluster)."""
    client = connect_sync(url, password, socket_timeout=30, socket_connect_timeout=5, **auth)
    low = f"{now_ms - int(ttl_s * 1000)}" if ttl_s else "-inf"
    out: dict[str, int] = {}
    try:
        offset, page = 0, 10_000
        while True:
            batch = client.zrangebyscore(key, low, "+inf", start=offset, num=page,
                                         withscores=True)
            pairs = cast(list[tuple[bytes, float]], batch)
            for member, score in pairs:
                out[bytes(member).decode("utf-8", "replace")] = int(score)
            if len(pairs) < page:
                return out
            offset += page
    finally:
        client.close()


class CheckpointUploadError(RuntimeError):
    """A checkpoint upload did not add up (it is dropped; the old checkpoint stays)."""


def same_slot_key(key: str, suffix: str) -> str:
    """A key for ``suffix`` in ``key``'s Redis Cluster hash slot: ``key``'s own hash tag
    when it has one (the part between its first ``{`` and the next ``}``, if not empty),
    else all of ``key`` as the tag.

    >>> same_slot_key("model:app", "upload:1")
    '{model:app}:upload:1'
    >>> same_slot_key("model:{app}", "upload:1")
    'model:{app}:upload:1'
    """
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return f"{key}:{suffix}"  # the same first tag, so the same slot
    if "{" in key or "}" in key:
        raise ValueError(f"key {key!r} has braces that are not a hash tag")
    return f"{{{key}}}:{suffix}"


#: a checkpoint goes to Redis in pieces of this size (see save_checkpoint)
CHECKPOINT_CHUNK = 1 << 20
#: an upload key left behind by a writer that died mid-upload expires after this
CHECKPOINT_UPLOAD_TTL_S = 600


async def save_checkpoint(
    client: aioredis.Redis[Any], key: str, blob: bytes, chunk: int = CHECKPOINT_CHUNK
) -> None:
    """Replace the checkpoint atomically (no TTL: it is the model).

    Redis runs one command at a time, and a single SET of a ~10 MB value held every other
    client (this worker's recommendation writes too) for its whole transfer: a freshness
    spike at every checkpoint (docs/benchmarks.md, session 8). The blob goes instead in
    ``chunk``-sized SET/APPENDs to an upload key of this writer's own, then one RENAME
    puts it in place: readers see the old checkpoint or the new one, never a part. The
    upload key shares the checkpoint key's hash slot (:func:`same_slot_key`), so RENAME
    works on Redis Cluster too, and it expires if the writer dies mid-upload. Each APPEND's
    reply (the new length) is checked: a piece sent twice or lost fails the upload."""
    upload = same_slot_key(key, f"upload:{uuid.uuid4().hex}")
    view = memoryview(blob)
    try:
        await client.set(upload, cast(Any, view[:chunk]), ex=CHECKPOINT_UPLOAD_TTL_S)
        for offset in range(chunk, len(view), chunk):
            piece = view[offset : offset + chunk]
            length = await client.append(upload, piece)  # type: ignore[no-untyped-call]
            if length != offset + len(piece):  # APPEND is not idempotent: never RENAME
                raise CheckpointUploadError(  # a retried or lost piece over the model
                    f"checkpoint upload {upload} is {length} bytes after the piece at "
                    f"{offset}, expected {offset + len(piece)}"
                )
        # one transaction: the upload's expiry must not come along, not even for a moment
        # (execute_command: redis-py's cluster pipeline refuses its rename() helper, though
        # a MULTI whose keys share one slot, as these do, is fine on Redis Cluster)
        async with client.pipeline(transaction=True) as tx:
            tx.execute_command("RENAME", upload, key)
            tx.execute_command("PERSIST", key)
            await tx.execute()
    except BaseException:
        with contextlib.suppress(Exception):
            await client.delete(upload)
        raise
