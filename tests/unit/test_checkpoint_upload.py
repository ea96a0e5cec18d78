"""save_checkpoint's bookkeeping (a fake client: the real-Redis behaviour is in
tests/integration/test_store.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from stream.adapters.redis_store import CheckpointUploadError, same_slot_key, save_checkpoint


class AppendsTwice:
    """Acts as if the second piece was applied twice (a retried APPEND)."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.renamed = False

    async def set(self, key: str, value: Any, ex: int | None = None) -> None:
        self.values[key] = bytes(value)

    async def append(self, key: str, value: Any) -> int:
        self.values[key] += bytes(value) * 2
        return len(self.values[key])

    async def delete(self, key: str) -> None:
        self.values.pop(key, None)

    def pipeline(self, transaction: bool = True) -> Any:
        self.renamed = True
        raise AssertionError("an upload that does not add up must never be renamed")


def test_an_upload_that_does_not_add_up_is_dropped_not_renamed() -> None:
    client = AppendsTwice()
    with pytest.raises(CheckpointUploadError, match="expected 8"):
        asyncio.run(save_checkpoint(client, "model:app", b"abcdefgh", chunk=4))  # type: ignore[arg-type]
    assert not client.renamed
    assert client.values == {}  # the upload key is deleted; the old checkpoint untouched


def test_upload_keys_share_the_checkpoint_keys_slot() -> None:
    assert same_slot_key("model:app", "upload:x") == "{model:app}:upload:x"
    assert same_slot_key("model:{app}", "upload:x") == "model:{app}:upload:x"
    with pytest.raises(ValueError, match="braces"):
        same_slot_key("model:{}app", "upload:x")
