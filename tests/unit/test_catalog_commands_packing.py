"""catalog_commands packs the play counts' commands with their constant parts packed once:
the bytes must be exactly pack_command's (the path it replaces, kept here as the reference)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from stream.adapters.redis_store import catalog_commands, pack_command, unpack_command
from stream.core.catalog import TrackInfo


def reference(
    prefix: str, changes: dict[str, Any], counts: dict[str, Any], ttl_s: Any
) -> list[bytes]:
    out: list[bytes] = []
    for track, (first_ms, info) in changes.items():
        key = f"{prefix}{track}"
        fields: list[Any] = []
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


@pytest.mark.parametrize("ttl_s", [60, 1, 90 * 86_400, "3600"])
@pytest.mark.parametrize("prefix", ["track:", "", "c\u00e9t:{x}:"])
def test_same_bytes_as_pack_command(ttl_s: Any, prefix: str) -> None:
    rng = random.Random(11)
    counts: dict[str, Any] = {}
    for i in range(300):
        track = "".join(chr(rng.randrange(32, 0x2000)) for _ in range(rng.randrange(24))) + str(i)
        counts[track] = (rng.randrange(0, 10**6), rng.randrange(-(2**45), 2**45))
    counts["bool"] = (True, False)  # not exactly int: pack_command's own path
    counts["big"] = (2**70, -(2**70))
    changes = {
        "t-new": (1000, TrackInfo("N\u00e9", "A", None)),
        "bool": (None, TrackInfo(None, None, None)),
        "big": (5, TrackInfo("x", "y", "z")),
    }
    got = catalog_commands(prefix, changes, counts, ttl_s)
    assert got == reference(prefix, changes, counts, ttl_s)
    assert all(unpack_command(c)[0] in (b"HSET", b"HSETNX", b"EXPIRE", b"HINCRBY") for c in got)
