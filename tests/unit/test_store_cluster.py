"""Redis Cluster replies in the writer's classification (stream.adapters.redis_store), without a
server: what the cluster pipeline hands back in place must never be blamed on one key."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.exceptions as rex

from stream.adapters.redis_store import PendingWrite, RecoWriter, error_code, is_server_error


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (rex.ClusterDownError("The cluster is down"), "CLUSTERDOWN"),
        (rex.TryAgainError("Multiple keys request during rehashing of slot"), "TRYAGAIN"),
        (rex.MovedError("3999 127.0.0.1:7001"), "MOVED"),
        (rex.AskError("3999 127.0.0.1:7001"), "ASK"),
    ],
)
def test_cluster_redirections_and_outages_are_server_errors(reply: Exception, code: str) -> None:
    assert error_code(reply) == code
    assert is_server_error(reply)


class FakeClusterPipeline:
    def __init__(self, replies: list[Any]) -> None:
        self.replies = replies
        self.commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> None:
        self.commands.append(args)

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        assert raise_on_error is False  # replies in place, each judged on its own
        return self.replies


class FakeCluster:
    """Stands in for redis.asyncio.RedisCluster (isinstance is what the writer checks)."""

    def __init__(self, replies: list[Any]) -> None:
        self.pipe = FakeClusterPipeline(replies)

    async def script_load(self, script: str) -> str:
        return "f" * 40

    def pipeline(self, transaction: bool = False) -> FakeClusterPipeline:
        assert transaction is False
        return self.pipe


def _writer(replies: list[Any], monkeypatch: pytest.MonkeyPatch) -> tuple[RecoWriter, list]:
    import redis.asyncio as aioredis

    monkeypatch.setattr(aioredis, "RedisCluster", FakeCluster)
    errors: list[tuple[str, str, bool]] = []
    writer = RecoWriter(
        FakeCluster(replies),  # type: ignore[arg-type]
        ttl_s=60,
        channel="c",
        on_key_error=lambda *e: errors.append(e),
    )
    for key in ("reco:a", "reco:b"):
        writer.submit(PendingWrite(key, 1, b"{}", b"{}", 0, None, 0.0, lineage="L"))
    return writer, errors


def test_an_unreachable_node_in_place_keeps_the_whole_batch(monkeypatch) -> None:
    writer, errors = _writer([1, rex.ConnectionError("node 7002 is down")], monkeypatch)
    assert asyncio.run(writer.flush_once()) is False  # retried whole, with backoff
    assert set(writer.pending) == {"reco:a", "reco:b"} and errors == []
    commands = writer.client.pipe.commands  # type: ignore[attr-defined]
    assert [c[0] for c in commands] == ["EVALSHA", "EVALSHA"]
    assert [c[3] for c in commands] == ["reco:a", "reco:b"]  # one key per script: no CROSSSLOT


def test_a_key_error_in_place_fails_that_key_alone(monkeypatch) -> None:
    writer, errors = _writer([1, rex.ResponseError("WRONGTYPE Operation")], monkeypatch)
    assert asyncio.run(writer.flush_once()) is True
    assert set(writer.pending) == {"reco:b"}
    assert errors == [("doc", "wrong_type", False)]


def test_catalogue_commands_go_unpacked_and_bool_replies_read_as_the_server_said(
    monkeypatch,
) -> None:
    from stream.adapters.redis_store import catalog_commands

    writer, errors = _writer([], monkeypatch)
    writer.pending.clear()
    packed = catalog_commands("track:", {}, {"t1": (3, 1000)}, 60)
    writer.submit_commands(packed)
    # HINCRBY -> 4, HSET -> 0 (field existed), EXPIRE -> True (redis-py's bool)
    writer.client.pipe.replies = [4, 0, True]  # type: ignore[attr-defined]
    assert asyncio.run(writer.flush_once()) is True
    commands = writer.client.pipe.commands  # type: ignore[attr-defined]
    assert commands[0] == ("HINCRBY", b"track:t1", b"plays", b"3")  # the name as str
    assert [c[1] for c in commands] == [b"track:t1"] * 3  # routed by the track's key
    assert errors == [] and writer.commands == [] and writer.dropped_commands == 0
