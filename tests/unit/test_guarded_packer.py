"""GuardedWritePacker packs a guarded document write into exactly the bytes of
``pack_command(b"EVALSHA", *RecoWriter._guarded_write(w))`` (the path it replaces)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from stream.adapters.redis_store import GuardedWritePacker, RecoWriter, pack_command
from stream.processing.documents import PendingWrite


def _write(key: Any, seq: Any, doc: Any, note: Any, lineage: Any) -> PendingWrite:
    return PendingWrite(key, seq, doc, note, 0, None, 0.0, lineage)


def _reference(sha: str, ttl_s: int, channel: str, w: PendingWrite) -> bytes:
    writer = RecoWriter.__new__(RecoWriter)
    writer._sha, writer.ttl_s, writer.channel = sha, ttl_s, channel
    return pack_command(b"EVALSHA", *writer._guarded_write(w))


CASES = [
    _write("reco:u1", 1, b"{}", b'{"user":"u1"}', "app"),
    _write("reco:{u\u00e9\u4e2d}", 0, b"", b"", ""),
    _write("reco:u2", 2**63 - 1, b"\r\n$3\r\n" * 50, b"\x00\xff", "lin\u00e9age"),
    _write("reco:u3", -5, bytes(range(256)) * 8, b"n", "a"),
    _write("reco:u4", True, b"d", b"n", "a"),  # bool: pack_command's int branch
    _write(b"reco:bytes-key", 3, b"d", b"n", "a"),  # not PendingWrite's types: fallback
    _write("reco:u5", 3, bytearray(b"doc"), b"n", b"lineage-bytes"),
]


@pytest.mark.parametrize("write", CASES)
@pytest.mark.parametrize("ttl_s,channel", [(600, "reco-updates"), (1, ""), (86_400, "ch\u00e9")])
def test_same_bytes_as_pack_command(write: PendingWrite, ttl_s: int, channel: str) -> None:
    sha = "0123456789abcdef" * 2 + "01234567"
    assert GuardedWritePacker(sha, ttl_s, channel)(write) == _reference(sha, ttl_s, channel, write)


def test_random_writes() -> None:
    rng = random.Random(7)
    packer = GuardedWritePacker("f" * 40, 3600, "reco-updates")
    for _ in range(500):
        key = "reco:" + "".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(20)))
        doc = rng.randbytes(rng.randrange(2000))
        note = rng.randbytes(rng.randrange(100))
        w = _write(key, rng.randrange(-(2**40), 2**40), doc, note, "app-" + str(rng.random()))
        assert packer(w) == _reference("f" * 40, 3600, "reco-updates", w)
