"""The Redis writer's reply classification and per-key isolation (no Redis: the round trip
is replaced by scripted replies; the real-Redis side is tests/integration/test_store.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
import redis.exceptions
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    NoPermissionError,
    NoScriptError,
    ReadOnlyError,
    ResponseError,
)

from stream.adapters.redis_store import (
    BAD_SEQ,
    STALE,
    WRITE_ERROR_REASONS,
    WRITTEN,
    WRONG_TYPE,
    PendingWrite,
    RecoWriter,
    error_code,
    is_server_error,
    write_error_reason,
)

OOM = redis.exceptions.OutOfMemoryError


def wrongtype() -> ResponseError:
    return ResponseError(
        "WRONGTYPE Operation against a key holding the wrong kind of value script: "
        "1f2e, on @user_script:5."
    )


@pytest.mark.parametrize(
    ("reply", "guarded", "reason"),
    [
        (WRITTEN, True, None),
        (STALE, True, None),
        (WRONG_TYPE, True, "wrong_type"),
        (BAD_SEQ, True, "bad_seq"),
        (7, True, "unexpected_reply"),
        (True, True, "unexpected_reply"),  # a bool is not the script's integer
        (b"OK", True, "unexpected_reply"),
        (None, True, "unexpected_reply"),
        (wrongtype(), True, "wrong_type"),
        (ResponseError("WRONGTYPE Operation against a key"), False, "wrong_type"),
        (NoPermissionError("this user has no permissions to access one of the keys"), True,
         "no_permission"),
        (NoPermissionError("No permissions to access a channel script: 1f2e"), True,
         "no_permission"),
        (ResponseError("user_script:7: attempt to compare nil with number script: 1f2e"), True,
         "script_error"),
        (ResponseError("Error running script (call to f_1f2e): @user_script:7"), True,
         "script_error"),
        (ResponseError("ERR value is not an integer or out of range"), False, "error_reply"),
        (ResponseError("value is not an integer or out of range"), False, "error_reply"),
        (b"OK", False, None),
        ("OK", False, None),
        (True, False, None),
        (0, False, None),  # DEL of a missing key
        (2, False, None),
        (-1, False, "unexpected_reply"),
        (b"QUEUED", False, "unexpected_reply"),
    ],
)
def test_each_reply_is_classified_on_its_own(reply: Any, guarded: bool, reason: str | None) -> None:
    got = write_error_reason(reply, guarded=guarded)
    assert got == reason
    assert got is None or got in WRITE_ERROR_REASONS


@pytest.mark.parametrize(
    ("reply", "server"),
    [
        (OOM("command not allowed when used memory > 'maxmemory'."), True),
        (ReadOnlyError("You can't write against a read only replica."), True),
        (ResponseError("BUSY Redis is busy running a script."), True),
        (ResponseError("MISCONF Redis is configured to save RDB snapshots"), True),
        (ResponseError("MASTERDOWN Link with MASTER is down"), True),
        (NoScriptError("No matching script."), True),
        (wrongtype(), False),
        (NoPermissionError("no permissions"), False),
        (ResponseError("ERR something about this key"), False),
        (1, False),
        (b"OK", False),
    ],
)
def test_server_errors_are_told_from_key_errors(reply: Any, server: bool) -> None:
    assert is_server_error(reply) is server


def test_error_code_with_and_without_status_code() -> None:
    assert error_code(ResponseError("WRONGTYPE Operation", status_code="WRONGTYPE")) == "WRONGTYPE"
    assert error_code(ResponseError("WRONGTYPE Operation")) == "WRONGTYPE"  # redis-py < 8
    assert error_code(NoPermissionError("no permissions")) == "NOPERM"
    assert error_code(ResponseError("something in lower case")) == "ERR"


# --------------------------------------------------------------------------- the writer


def doc(key: str, seq: int = 1) -> PendingWrite:
    return PendingWrite(key, seq, b"{}", b"{}", 0, None, 0.0, "app")


class ScriptedWriter(RecoWriter):
    """A RecoWriter whose round trip answers from ``answer(kind, key)`` (or raises)."""

    def __init__(self, answer: Any, **kw: Any) -> None:
        self.events: list[tuple[str, str, bool]] = []
        self.flushed: list[tuple[list[str], list[int]]] = []
        self.errors: list[str] = []
        super().__init__(
            None,  # type: ignore[arg-type]
            ttl_s=60,
            channel="c",
            flush_interval_ms=0,
            retry_max_s=0.02,
            key_retry_s=0.01,
            on_key_error=lambda kind, reason, dropped: self.events.append((kind, reason, dropped)),
            on_flush=lambda b, r, s: self.flushed.append(([w.key for w in b], r)),
            on_error=lambda exc, s: self.errors.append(type(exc).__name__),
            **kw,
        )
        self.answer = answer
        self.sent: list[list[str]] = []

    async def _send(
        self,
        batch: list[PendingWrite],
        deletes: list[str],
        plain: dict[str, bytes] | None = None,
        commands: Sequence[bytes] = (),
    ) -> list[Any]:
        plain = plain or {}
        self.sent.append(deletes + list(plain) + [w.key for w in batch])
        replies = [self.answer("del", k) for k in deletes]
        replies += [self.answer("plain", k) for k in plain]
        replies += [self.answer("catalog", c.split(b"\r\n")[4].decode()) for c in commands]
        replies += [self.answer("doc", w.key) for w in batch]
        for r in replies:
            if is_server_error(r) or isinstance(r, RedisConnectionError):
                raise r
        return replies


async def run_until_drained(writer: RecoWriter, timeout: float = 5.0) -> None:
    writer.start()
    await asyncio.wait_for(writer.drained(), timeout)
    await writer.stop()


def test_a_failing_key_does_not_hold_back_the_others() -> None:
    def answer(kind: str, key: str) -> Any:
        if key == "reco:victim":
            return WRONG_TYPE
        if key == "similar:bad":
            return wrongtype()
        return b"OK" if kind == "plain" else 1

    writer = ScriptedWriter(answer)

    async def scenario() -> None:
        for user in ("a", "victim", "b"):
            writer.submit(doc(f"reco:{user}"))
        writer.submit_plain("similar:ok", b"{}")
        writer.submit_plain("similar:bad", b"{}")
        await run_until_drained(writer)

    asyncio.run(scenario())
    # the first flush wrote everyone else; the victims alone were retried, then dropped
    assert writer.flushed[0] == (["reco:a", "reco:b"], [1, 1])
    assert all(keys == [] for keys, _ in writer.flushed[1:])
    assert writer.sent[0] == ["similar:ok", "similar:bad", "reco:a", "reco:victim", "reco:b"]
    assert writer.sent[1:] == [["similar:bad", "reco:victim"]] * 2
    assert writer.events == [
        ("plain", "wrong_type", False), ("doc", "wrong_type", False),
        ("plain", "wrong_type", False), ("doc", "wrong_type", False),
        ("plain", "wrong_type", True), ("doc", "wrong_type", True),
    ]
    assert writer.dropped_total == 2
    assert not writer.pending and not writer.plain and not writer._failures
    assert writer.errors == []


def test_a_key_that_recovers_is_written_and_its_failures_forgotten() -> None:
    calls = {"n": 0}

    def answer(kind: str, key: str) -> Any:
        if key == "reco:flaky":
            calls["n"] += 1
            return BAD_SEQ if calls["n"] == 1 else 1
        return 1

    writer = ScriptedWriter(answer)
    asyncio.run(run_until_drained_after(writer, [doc("reco:flaky"), doc("reco:x")]))
    assert writer.events == [("doc", "bad_seq", False)]
    assert writer.flushed[0] == (["reco:x"], [1])
    assert writer.flushed[1] == (["reco:flaky"], [1])
    assert writer.dropped_total == 0 and not writer._failures


async def run_until_drained_after(writer: RecoWriter, writes: list[PendingWrite]) -> None:
    for w in writes:
        writer.submit(w)
    await run_until_drained(writer)


@pytest.mark.parametrize(
    "failure",
    [
        RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
        OOM("command not allowed when used memory > 'maxmemory'."),
        ReadOnlyError("You can't write against a read only replica."),
    ],
    ids=["connection", "oom", "readonly"],
)
def test_server_and_connection_errors_keep_the_whole_batch(failure: Exception) -> None:
    """Redis down or refusing everyone: nothing is dropped, everything is retried, no key is
    blamed; once Redis is back the whole batch is written."""
    state = {"down": 4}

    def answer(kind: str, key: str) -> Any:
        if state["down"]:
            return failure
        return 1

    writer = ScriptedWriter(answer)
    real_send = writer._send

    async def send(*args: Any, **kw: Any) -> list[Any]:
        try:
            return await real_send(*args, **kw)
        finally:
            state["down"] = max(0, state["down"] - 1)

    writer._send = send  # type: ignore[method-assign]
    asyncio.run(run_until_drained_after(writer, [doc(f"reco:u{i}") for i in range(5)]))
    assert len(writer.errors) == 4
    assert writer.events == [] and writer.dropped_total == 0
    assert writer.flushed == [([f"reco:u{i}" for i in range(5)], [1] * 5)]


def test_a_newer_document_for_a_failing_key_is_kept() -> None:
    """A write that fails while a newer one for the same listener arrives: the newer one
    stays pending (it has not been tried) and is written when the key works again."""
    state = {"broken": True}
    writer: ScriptedWriter

    def answer(kind: str, key: str) -> Any:
        if state["broken"]:
            writer.submit(doc(key, seq=2))  # arrives during the flush
            state["broken"] = False
            return WRONG_TYPE
        return 1

    writer = ScriptedWriter(answer)
    asyncio.run(run_until_drained_after(writer, [doc("reco:u", seq=1)]))
    assert writer.events == [("doc", "wrong_type", False)]
    assert writer.flushed[-1] == (["reco:u"], [1])


def test_forget_drops_a_failing_write_and_its_retry() -> None:
    writer = ScriptedWriter(lambda kind, key: WRONG_TYPE if kind == "doc" else 1, key_attempts=50)

    async def scenario() -> None:
        writer.submit(doc("reco:gone"))
        writer.start()
        while not writer.events:
            await asyncio.sleep(0.005)
        writer.forget("reco:gone")
        await asyncio.wait_for(writer.drained(), 5)
        await writer.stop()

    asyncio.run(scenario())
    assert not writer.pending and not writer._failures and not writer.deletes
    assert writer.sent[-1] == ["reco:gone"]  # the DEL


def test_key_attempts_is_validated() -> None:
    with pytest.raises(ValueError, match="key_attempts"):
        RecoWriter(None, ttl_s=1, channel="", key_attempts=0)  # type: ignore[arg-type]


def test_a_failing_catalogue_write_is_counted_and_dropped_never_retried() -> None:
    """Track catalogue commands (HINCRBY is not idempotent) that fail for their key are
    counted and dropped; the documents of the same flush are written."""
    from stream.adapters.redis_store import catalog_commands

    def answer(kind: str, key: str) -> Any:
        if key == "track:bad":
            return wrongtype()
        return 1

    writer = ScriptedWriter(answer)

    async def go() -> None:
        writer.submit_commands(
            catalog_commands("track:", {}, {"good": (2, 5), "bad": (1, 5)}, 60))
        writer.submit(doc("reco:u1"))
        await run_until_drained(writer)

    asyncio.run(go())
    assert writer.flushed == [(["reco:u1"], [1])]
    assert writer.events == [("catalog", "wrong_type", True)] * 3  # HINCRBY, HSET, EXPIRE
    assert writer.dropped_commands == 3 and writer.commands == []
    assert len(writer.sent) == 1  # not retried
