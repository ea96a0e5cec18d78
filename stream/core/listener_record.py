"""A listener's partition-local model state as one compact, validated record.

Everything the recommender keys by a listener (their MF factor vector and, with the
``repeats`` option, their last distinct tracks) travels as one string in the listener's
session state (:attr:`stream.core.session.UserState.model`), so it lives in the changelog-backed
table: it moves with the listener's partition on a rebalance and is restored from the
changelog after a crash. The global model checkpoint holds item-side state only.

The record is base64 (JSON-safe, so the session codec stores it as it is) of::

    b"L1" | uint16 n_factors | n_factors x float32 (little endian, finite) |
    uint8 n_own | n_own x (uint16 length | utf-8 track id)

Pure: no I/O. A record read back from Kafka is untrusted: :func:`decode_listener_record`
checks every field and raises ValueError naming it.

>>> import numpy as np
>>> rec = encode_listener_record(np.ones(4, dtype=np.float32), ["t1"])
>>> f, own = decode_listener_record(rec, n_factors=4, max_own=5)
>>> f.tolist(), own
([1.0, 1.0, 1.0, 1.0], ['t1'])
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from stream.core.events import InvalidField, check_id

MAGIC: Final = b"L1"
#: the largest record accepted (a 256-factor vector and 255 ids of 256 characters fit)
MAX_RECORD_CHARS: Final = 96 * 1024
#: factor values beyond this are not a trained model's (SGD with L2 stays near 1)
MAX_FACTOR: Final = 1e4

Float32Array = npt.NDArray[np.float32]

_F4: Final = np.dtype("<f4")
#: the record's first bytes per factor count
_HEADS: dict[int, bytes] = {}


def encode_listener_record(factors: Float32Array | None, own: Sequence[str] = ()) -> str:
    """The record of one listener ("" when there is nothing to keep)."""
    if factors is None and not own:
        return ""
    if not own and type(factors) is np.ndarray and factors.dtype == _F4 \
            and factors.ndim == 1 and factors.flags.c_contiguous:
        # the common record (factors only), once per play: the same bytes, ~2x faster
        n = len(factors)
        head = _HEADS.get(n) or _HEADS.setdefault(n, MAGIC + struct.pack("<H", n))
        return base64.b64encode(head + factors.tobytes() + b"\x00").decode("ascii")
    vec = (np.zeros(0, dtype="<f4") if factors is None
           else np.ascontiguousarray(factors, dtype="<f4"))
    own = list(own)[-255:]
    parts = [MAGIC, struct.pack("<H", len(vec)), vec.tobytes(), struct.pack("<B", len(own))]
    for t in own:
        raw = t.encode()
        parts.append(struct.pack("<H", len(raw)))
        parts.append(raw)
    return base64.b64encode(b"".join(parts)).decode("ascii")


def decode_listener_record(
    record: str, *, n_factors: int, max_own: int
) -> tuple[Float32Array | None, list[str]]:
    """(factors or None, own recent tracks) of a record, every field checked: ValueError
    names the bad one. ``n_factors`` must match the model (or the record has none)."""
    if type(record) is not str:
        raise ValueError("listener record: not a string")
    if len(record) > MAX_RECORD_CHARS:
        raise ValueError(f"listener record: over {MAX_RECORD_CHARS} characters")
    try:
        raw = base64.b64decode(record.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError("listener record: not base64") from exc
    if raw[:2] != MAGIC:
        raise ValueError("listener record: unknown format (expected L1)")
    try:
        (k,) = struct.unpack_from("<H", raw, 2)
        pos = 4
        if k not in (0, n_factors):
            raise ValueError(f"listener record.factors: {k} factors, the model has {n_factors}")
        if len(raw) < pos + 4 * k + 1:
            raise ValueError("listener record.factors: truncated")
        vec = np.frombuffer(raw, dtype="<f4", count=k, offset=pos).astype(np.float32)
        pos += 4 * k
        if not np.all(np.isfinite(vec)) or (k and float(np.abs(vec).max()) > MAX_FACTOR):
            raise ValueError("listener record.factors: not finite or out of range")
        (n_own,) = struct.unpack_from("<B", raw, pos)
        pos += 1
        if n_own > max_own:
            raise ValueError(f"listener record.own: {n_own} tracks, at most {max_own}")
        own: list[str] = []
        for _ in range(n_own):
            (n,) = struct.unpack_from("<H", raw, pos)
            pos += 2
            if pos + n > len(raw):
                raise ValueError("listener record.own: truncated")
            own.append(check_id(raw[pos : pos + n].decode("utf-8"), "own"))
            pos += n
    except struct.error as exc:
        raise ValueError("listener record: truncated") from exc
    except UnicodeDecodeError as exc:
        raise ValueError("listener record.own: not utf-8") from exc
    except InvalidField as exc:
        raise ValueError(f"listener record.own: {exc}") from exc
    if pos != len(raw):
        raise ValueError("listener record: trailing bytes")
    if len(set(own)) != len(own):
        raise ValueError("listener record.own: repeated track id")
    return (vec if k else None), own
