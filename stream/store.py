"""Redis recommendation store -- the only module that imports redis.

Contract (see README "Reading recommendations"):

- ``{prefix}{user_id}`` (default ``reco:u42``) holds one JSON document::

    {"user_id": "u42", "seq": 17, "lineage": "stream-reco", "k": 10, "model_version": "...",
     "generated_at": 1700000000123, "event_ts": 1700000000000, "event_id": "...",
     "session": {"session_id": "u42#3", "session_plays": 4, "sessions_total": 3,
                 "plays_total": 17, "skips_total": 5, "skip_streak": 0},
     "items": [{"track_id": "t1", "score": 0.42, "reason": "because you played Airbag by
                Radiohead", "reason_code": "played", "reason_track_id": "t9",
                "name": "Let Down", "artist": "Radiohead"}, ...]}

  (``name``/``artist``/``album`` only when known; JSON Schema in
  ``configs/schemas/recommendations.schema.json``)

  written atomically (one ``SET ... EX ttl`` inside a Lua script) with a TTL. ``seq`` is the
  listener's count of applied events: the script refuses a document whose ``seq`` is lower
  than the stored one, so a re-delivered or late write can never regress a newer list.
- ``{catalog_prefix}{track_id}`` (default ``track:t1``) is the track catalogue hash: name,
  artist, album, first_seen, last_seen, plays (:func:`catalog_commands`).
- every accepted write publishes ``{"user_id", "seq", "event_id", "event_ts",
  "generated_at"}`` on the channel ``reco-updates`` (configurable).

The worker side (:class:`RecoWriter`) coalesces updates per user and flushes them in
pipelined batches every few milliseconds, retrying with backoff while Redis is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import orjson
import redis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger(__name__)

WRITE_SCRIPT: Final = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, old = pcall(cjson.decode, cur)
  -- refuse to go back in the same lineage (the same app's state); a document from another
  -- lineage (a re-deployment under a new app id, a rebuilt state) is simply replaced
  if ok and type(old) == 'table' and old['seq'] and (old['lineage'] or '') == ARGV[6]
     and tonumber(old['seq']) > tonumber(ARGV[1]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
return 1
"""


#: the most packed extra commands (track catalogue writes) a writer keeps while Redis is down
MAX_COMMANDS: Final = 200_000


@dataclass(frozen=True, slots=True)
class PendingWrite:
    """A recommendation document waiting for the next flush."""

    key: str
    seq: int
    doc: bytes
    notification: bytes
    event_ts_ms: int
    ingest_ts_ms: int | None
    enqueued_at: float
    #: whose state ``seq`` counts (the app id; also inside ``doc``): the guard compares within it
    lineage: str = ""
    #: False for a re-publication of an older play (after a crash replay): not a freshness sample
    fresh: bool = True


def encode_document(
    *,
    user_id: str,
    seq: int,
    items: Sequence[Any],
    generated_at_ms: int,
    event_ts_ms: int,
    event_id: str,
    model_version: str,
    session: dict[str, Any] | None = None,
    lineage: str = "",
) -> tuple[bytes, bytes]:
    """The JSON document and its pub/sub notification. ``items`` are JSON-ready dicts
    (:meth:`stream.catalog.TrackCatalog.items`) or objects with track_id/score/reason."""
    doc = {
        "user_id": user_id,
        "seq": seq,
        "lineage": lineage,
        "k": len(items),
        "model_version": model_version,
        "generated_at": generated_at_ms,
        "event_ts": event_ts_ms,
        "event_id": event_id,
        "session": session or {},
        "items": [
            it if isinstance(it, dict)  # built with names and reason codes (stream.catalog)
            else {"track_id": it.track_id, "score": float(it.score), "reason": it.reason}
            for it in items
        ],
    }
    note = {
        "user_id": user_id,
        "seq": seq,
        "event_id": event_id,
        "event_ts": event_ts_ms,
        "generated_at": generated_at_ms,
    }
    return orjson.dumps(doc), orjson.dumps(note)


FlushCallback = Callable[[list[PendingWrite], list[int], float], None]
ErrorCallback = Callable[[Exception, float], None]


class RecoWriter:
    """Coalescing, pipelined, retrying writer of recommendation documents.

    ``submit`` never blocks on Redis: it replaces any pending document of the same user
    (a newer ``seq`` wins) and wakes the flusher. The flusher sends up to ``max_batch``
    documents per pipeline round trip. On a Redis error the batch stays pending and is
    retried with exponential backoff (capped at ``retry_max_s``); nothing is dropped.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        ttl_s: int,
        channel: str,
        flush_interval_ms: float = 2.0,
        max_batch: int = 512,
        retry_max_s: float = 5.0,
        on_flush: FlushCallback | None = None,
        on_error: ErrorCallback | None = None,
        before_flush: Callable[[], object] | None = None,
        has_work: Callable[[], bool] | None = None,
    ) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.channel = channel
        self.flush_interval_s = flush_interval_ms / 1000.0
        self.max_batch = max_batch
        self.retry_max_s = retry_max_s
        self.on_flush = on_flush
        self.on_error = on_error
        #: called right before each flush (the worker ranks its pending listeners there)
        self.before_flush = before_flush
        #: whether the before_flush hook has work queued (so drained() waits for it)
        self.has_work = has_work
        self.pending: dict[str, PendingWrite] = {}
        self.deletes: set[str] = set()
        #: unguarded documents (key -> JSON), e.g. per-track "more like this" lists
        self.plain: dict[str, bytes] = {}
        #: other packed commands (the track catalogue's HSETs/HINCRBYs), sent in order;
        #: at most MAX_COMMANDS wait (a long Redis outage drops the oldest, counted here)
        self.commands: list[bytes] = []
        self.dropped_commands = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._sha: str | None = None
        self._stopping = False
        self.consecutive_failures = 0

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
                if not self.dropped_commands:
                    logger.warning("Redis unreachable: dropping the oldest catalogue writes")
                self.dropped_commands += excess
            self._idle.clear()
            self._wake.set()

    def wake(self) -> None:
        """Ask for a flush soon (work is queued in the before_flush hook)."""
        self._idle.clear()
        self._wake.set()

    def _busy(self) -> bool:
        return bool(
            self.pending or self.deletes or self.plain or self.commands
            or (self.has_work and self.has_work())
        )

    def forget(self, key: str) -> None:
        """Delete ``key`` (a forgotten listener): drops any pending write for it, and the DEL
        is sent before writes in the next flush."""
        self.pending.pop(key, None)
        self.deletes.add(key)
        self._idle.clear()
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="reco-writer")

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
            await self._wake.wait()
            self._wake.clear()
            if self.flush_interval_s:
                # let a burst accumulate so one round trip carries many users
                await asyncio.sleep(self.flush_interval_s)
            if self.before_flush is not None:
                try:
                    self.before_flush()
                except Exception:  # noqa: BLE001 - never let the hook kill the flusher
                    logger.exception("before_flush hook failed")
            while self.pending or self.deletes or self.plain or self.commands:
                ok = await self.flush_once()
                if not ok:
                    backoff = min(self.retry_max_s, 0.05 * 2 ** min(self.consecutive_failures, 10))
                    await asyncio.sleep(backoff)
            self._idle.set()

    async def flush_once(self) -> bool:
        """Send one batch. Returns False (and keeps the batch pending) on a Redis error."""
        keys = list(self.pending)[: self.max_batch]
        batch = [self.pending[k] for k in keys]
        deletes = list(self.deletes)
        plain = dict(list(self.plain.items())[: self.max_batch])
        commands = self.commands[: 4 * self.max_batch]
        started = time.perf_counter()
        try:
            results = await self._send(batch, deletes, plain, commands)
        except (RedisError, OSError) as exc:
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
        self.deletes.difference_update(deletes)
        del self.commands[: len(commands)]
        for key, doc in plain.items():
            if self.plain.get(key) is doc:
                del self.plain[key]
        for write in batch:
            # only drop it if no newer document for that user arrived during the flush
            if self.pending.get(write.key) is write:
                del self.pending[write.key]
        if self.on_flush is not None:
            self.on_flush(batch, [int(r) for r in results], time.perf_counter() - started)
        return True

    async def _send(
        self,
        batch: list[PendingWrite],
        deletes: list[str],
        plain: dict[str, bytes] | None = None,
        commands: Sequence[bytes] = (),
    ) -> list[Any]:
        """One round trip: DELs, plain SETs, then one guarded write per document; returns the
        guarded writes' results (1 written, 0 refused as stale).

        The commands are packed here (:func:`pack_command`) and their replies read back on
        one pooled connection: redis-py's pipeline packed and parsed each command in Python
        at ~50-95 us of CPU per document (py-spy: 6.5 % of the worker), this costs a few.
        Any error but a missing script drops the connection, so no reply is left unread;
        the caller retries the whole batch (the ``seq`` guard makes writes idempotent)."""
        plain = plain or {}
        if self._sha is None:
            self._sha = await self.client.script_load(WRITE_SCRIPT)
        for attempt in range(2):
            parts: list[bytes] = []
            for key in deletes:
                parts.append(pack_command(b"DEL", key))
            for key, doc in plain.items():
                parts.append(pack_command(b"SET", key, doc, b"EX", self.ttl_s))
            parts.extend(commands)
            for w in batch:
                parts.append(
                    pack_command(
                        b"EVALSHA",
                        self._sha,
                        1,
                        w.key,
                        w.seq,
                        w.doc,
                        self.ttl_s,
                        self.channel,
                        w.notification,
                        w.lineage,
                    )
                )
            replies = await self._round_trip(parts)
            if any(isinstance(r, NoScriptError) for r in replies):
                # Redis restarted and lost its script cache: load it and send the batch again
                self._sha = await self.client.script_load(WRITE_SCRIPT)
                if attempt:
                    raise next(r for r in replies if isinstance(r, NoScriptError))
                continue
            for r in replies:
                if isinstance(r, Exception):
                    raise r
            return replies[len(deletes) + len(plain) + len(commands) :]
        raise AssertionError("unreachable")

    async def _round_trip(self, commands: list[bytes]) -> list[Any]:
        """Send packed ``commands`` on one pooled connection and read one reply each (error
        replies come back as exception objects, in place)."""
        pool = self.client.connection_pool
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
    url: str,
    password: str = "",
    *,
    username: str = "",
    tls_ca_file: str = "",
    tls_cert_file: str = "",
    tls_key_file: str = "",
) -> aioredis.Redis:
    """The worker's Redis client (see :func:`client_options` for auth and TLS)."""
    url, kwargs = client_options(
        url,
        password=password,
        username=username,
        tls_ca_file=tls_ca_file,
        tls_cert_file=tls_cert_file,
        tls_key_file=tls_key_file,
    )
    return aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, **kwargs)


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
    for track, (plays, last_ms) in counts.items():
        key = f"{prefix}{track}"
        out.append(pack_command(b"HINCRBY", key, b"plays", plays))
        out.append(pack_command(b"HSET", key, b"last_seen", last_ms))
        out.append(pack_command(b"EXPIRE", key, ttl_s))
    return out


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
    async with client.pipeline(transaction=False) as pipe:
        for track in track_ids:
            pipe.hmget(f"{prefix}{track}", "name", "artist", "album")
        replies = await pipe.execute()
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


@dataclass(frozen=True, slots=True)
class RecoItem:
    track_id: str
    score: float
    reason: str
    reason_code: str | None = None
    reason_track_id: str | None = None
    name: str | None = None
    artist: str | None = None
    album: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecoItem:
        return cls(
            d["track_id"], float(d["score"]), d["reason"], d.get("reason_code"),
            d.get("reason_track_id"), d.get("name"), d.get("artist"), d.get("album"),
        )


@dataclass(frozen=True, slots=True)
class RecoDocument:
    user_id: str
    seq: int
    items: list[RecoItem]
    generated_at_ms: int
    event_ts_ms: int
    event_id: str
    model_version: str
    session: dict[str, Any]

    @classmethod
    def from_json(cls, raw: bytes | str) -> RecoDocument:
        d = orjson.loads(raw)
        return cls(
            user_id=d["user_id"],
            seq=int(d["seq"]),
            items=[RecoItem.from_dict(i) for i in d["items"]],
            generated_at_ms=int(d["generated_at"]),
            event_ts_ms=int(d["event_ts"]),
            event_id=d["event_id"],
            model_version=d.get("model_version", ""),
            session=d.get("session", {}),
        )


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
        catalog_prefix: str = "track:",
    ) -> None:
        url, kwargs = client_options(
            url,
            password=password,
            username=username,
            tls_ca_file=tls_ca_file,
            tls_cert_file=tls_cert_file,
            tls_key_file=tls_key_file,
        )
        self.client = redis.Redis.from_url(url, socket_timeout=5, **kwargs)
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
        """Yield update notifications until ``timeout_s`` passes without one."""
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


def load_checkpoint(url: str, key: str, password: str = "", **auth: str) -> bytes | None:
    """Read a model checkpoint synchronously (worker start-up, before the event loop)."""
    url, kwargs = client_options(url, password=password, **auth)
    kwargs.update(socket_timeout=30, socket_connect_timeout=5)
    client = redis.Redis.from_url(url, **kwargs)
    try:
        raw = client.get(key)
    finally:
        client.close()
    return None if raw is None else bytes(raw)  # type: ignore[arg-type]


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
    client: aioredis.Redis, key: str, blob: bytes, chunk: int = CHECKPOINT_CHUNK
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
        async with client.pipeline(transaction=True) as tx:
            tx.rename(upload, key)
            tx.persist(key)
            await tx.execute()
    except BaseException:
        with contextlib.suppress(Exception):
            await client.delete(upload)
        raise
