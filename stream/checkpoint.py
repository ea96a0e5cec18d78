"""Framing for model checkpoints: a version tag, an optional HMAC-SHA256 signature, payload.

Recommender snapshots are pickles, and unpickling runs code: with ``checkpoint_secret`` set,
a checkpoint whose signature does not verify is refused, so only a holder of the secret can
make the worker load a model. Pure (no I/O).

>>> blob = frame(b"model-bytes", secret="s3")
>>> unframe(blob, secret="s3")
b'model-bytes'
>>> unframe(blob, secret="other")
Traceback (most recent call last):
...
stream.checkpoint.CheckpointError: checkpoint signature does not verify (wrong checkpoint_secret?)
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from stream.errors import StreamError

MAGIC_SIGNED: Final = b"SRCK1S"
MAGIC_PLAIN: Final = b"SRCK1P"


class CheckpointError(StreamError):
    """A checkpoint could not be verified or decoded."""


def frame(payload: bytes, secret: str = "") -> bytes:
    if secret:
        mac = hmac.new(secret.encode(), payload, hashlib.sha256).digest()
        return MAGIC_SIGNED + mac + payload
    return MAGIC_PLAIN + payload


def unframe(blob: bytes, secret: str = "") -> bytes:
    if blob.startswith(MAGIC_SIGNED):
        if not secret:
            raise CheckpointError("checkpoint is signed but checkpoint_secret is not set")
        mac, payload = (
            blob[len(MAGIC_SIGNED) : len(MAGIC_SIGNED) + 32],
            blob[len(MAGIC_SIGNED) + 32 :],
        )
        expected = hmac.new(secret.encode(), payload, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            raise CheckpointError("checkpoint signature does not verify (wrong checkpoint_secret?)")
        return payload
    if blob.startswith(MAGIC_PLAIN):
        if secret:
            raise CheckpointError("checkpoint is unsigned but checkpoint_secret is set; refusing")
        return blob[len(MAGIC_PLAIN) :]
    raise CheckpointError("not a stream-reco checkpoint (bad magic bytes)")
