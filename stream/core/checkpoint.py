"""The model checkpoint format: data only, signed, checked before anything is built from it.

A checkpoint is read from Redis, which others may be able to write, so nothing in it is
code and nothing in it is trusted until checked:

- **State** (:func:`pack_state`): the recommender's ``export_state()`` pair -- a JSON
  manifest and numeric numpy arrays -- as ``STATE_MAGIC``, the manifest (4-byte big-endian
  length, UTF-8 JSON), an index of the arrays (same framing: ``[name, dtype, shape,
  offset]`` each) and the arrays' raw bytes. Only bool/integer/float dtypes exist in it,
  so reading it back is ``np.frombuffer`` on checked offsets: nothing in a checkpoint is
  ever turned into a Python object other than JSON values and numbers.
- **Envelope** (:func:`seal`): ``MAGIC``, the header's length (4 bytes, big-endian), a
  JSON header ``{"format", "kid", "app_id", "created_ms", "payload_bytes"}``, the state,
  and a 32-byte HMAC-SHA256 over everything before it -- so the signature covers the key
  id, the app id, the format version, the creation time and the payload. ``kid`` names
  the key that signed; ``null`` marks an unsigned checkpoint (``checkpoint_insecure``).
- **Keys** (:class:`KeySet`): ``checkpoint_keys = "kid1:secret1,kid2:secret2"``. The
  first key signs; any listed key verifies, which is how keys rotate: put the new key
  first and keep the old one listed until every checkpoint it signed has been replaced.

:func:`open_checkpoint` checks, in this order, size, framing, format version, signature
(before the payload is parsed at all), app id and age, then the state itself; any failure
raises :class:`CheckpointRejected` with a ``reason`` from :data:`REJECT_REASONS` (the
worker counts it in ``stream_checkpoints_rejected_total{reason}`` and starts fresh).
Pure: no I/O, and the caller passes the time in.

>>> keys = KeySet.parse("k2:second-secret-0123456789,k1:first-secret-0123456789")
>>> blob = seal(pack_state({"n": 1}, {}), keys=keys, app_id="app", created_ms=1_000)
>>> unpack_state(open_checkpoint(blob, keys=keys, app_id="app", now_ms=2_000).payload)[0]
{'n': 1}
>>> open_checkpoint(blob, keys=keys, app_id="other", now_ms=2_000)
Traceback (most recent call last):
...
stream.core.checkpoint.CheckpointRejected: checkpoint is for app 'app', this worker is 'other'
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from stream.errors import StreamError

MAGIC: Final = b"STREAMCK"
STATE_MAGIC: Final = b"SRSTATE1"
#: version of the envelope + state layout; a checkpoint of another version is rejected
FORMAT_VERSION: Final = 2
#: the magic bytes of format-1 checkpoints (serialised Python objects): rejected, never read
LEGACY_MAGIC: Final = (b"SRCK1S", b"SRCK1P")
_TAG_BYTES: Final = 32
_MAX_HEADER_BYTES: Final = 4096
_MAX_MANIFEST_BYTES: Final = 1 << 24
#: a checkpoint dated this far in the future (clock skew between hosts) is still accepted
FUTURE_SKEW_MS: Final = 5 * 60 * 1000
_KID: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: shortest secret accepted (characters)
MIN_SECRET_LEN: Final = 16
#: array dtypes a checkpoint may hold (numpy's dtype strings): bool, integers and floats,
#: little-endian; nothing that holds Python objects or structure
_DTYPES: Final = frozenset(
    {"|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f4", "<f8"}
)
#: arrays start at multiples of this many bytes in the payload
_ALIGN: Final = 8
#: the most dimensions an array may have
_MAX_DIMS: Final = 8

#: why a checkpoint was rejected (the label values of stream_checkpoints_rejected_total)
REJECT_REASONS: Final = (
    "oversized",      # larger than checkpoint_max_bytes
    "malformed",      # not this format's framing, or a payload that does not parse
    "truncated",      # shorter than its header says
    "version",        # another format version (including format 1)
    "unsigned",       # no signature, and this worker requires one
    "unknown_key",    # signed with a key id this worker does not hold
    "bad_signature",  # the HMAC does not verify: forged or corrupted
    "foreign_app",    # signed for another app id
    "too_old",        # older than checkpoint_max_age_s
    "future",         # dated in the future (beyond FUTURE_SKEW_MS)
    "invalid_state",  # verified, but the model state fails its checks
    "unreadable",     # Redis could not be read (the worker starts fresh)
)


class CheckpointError(StreamError):
    """A checkpoint could not be verified or decoded."""


class CheckpointRejected(CheckpointError):
    """A checkpoint was refused; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class KeySet:
    """Checkpoint keys by id; the first one signs, every one verifies."""

    keys: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def parse(cls, spec: str, legacy_secret: str = "") -> KeySet:
        """Keys from ``"kid1:secret1,kid2:secret2"`` (``checkpoint_keys``), plus a
        ``legacy_secret`` (``checkpoint_secret``) as key id ``default``, listed last (so it
        signs only when it is the only key). Raises ValueError on a malformed list."""
        keys: list[tuple[str, bytes]] = []
        for n, item in enumerate(filter(None, (p.strip() for p in spec.split(","))), 1):
            kid, sep, secret = item.partition(":")
            if not sep or not _KID.fullmatch(kid):
                raise ValueError(f"entry {n}: expected kid:secret with a key id of "
                                 "[A-Za-z0-9._-]{1,64}")
            keys.append((kid, _secret(secret, f"key {kid!r}")))
        if legacy_secret:
            keys.append(("default", _secret(legacy_secret, "checkpoint_secret")))
        ids = [kid for kid, _ in keys]
        if len(set(ids)) != len(ids):
            raise ValueError("a key id is listed twice")
        return cls(tuple(keys))

    def __bool__(self) -> bool:
        return bool(self.keys)

    @property
    def ids(self) -> list[str]:
        return [kid for kid, _ in self.keys]

    def signer(self) -> tuple[str, bytes] | None:
        return self.keys[0] if self.keys else None

    def get(self, kid: str) -> bytes | None:
        return dict(self.keys).get(kid)


def _secret(secret: str, what: str) -> bytes:
    if len(secret) < MIN_SECRET_LEN:
        raise ValueError(f"{what}: the secret must be at least {MIN_SECRET_LEN} characters")
    return secret.encode("utf-8")


# --------------------------------------------------------------------------- state


def pack_state(manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> bytes:
    """``export_state()``'s manifest and arrays as bytes (no signature: see :func:`seal`)."""
    index: list[list[Any]] = []
    offset = 0
    parts: list[Any] = []
    for name, array in arrays.items():
        dtype = getattr(array, "dtype", None)
        if not isinstance(array, np.ndarray) or dtype is None or dtype.str not in _DTYPES:
            raise CheckpointError(f"array {name!r}: dtype {dtype} is not one a checkpoint holds")
        data = np.ascontiguousarray(array)
        pad = -offset % _ALIGN
        if pad:
            parts.append(bytes(pad))
            offset += pad
        index.append([name, dtype.str, list(array.shape), offset])
        parts.append(data.data.cast("B") if data.size else b"")
        offset += data.nbytes
    text = _json(manifest)
    table = _json(index)
    head = (STATE_MAGIC + struct.pack(">I", len(text)) + text
            + struct.pack(">I", len(table)) + table)
    return b"".join((head, *parts))


def unpack_state(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The manifest and arrays :func:`pack_state` wrote, with the framing, dtypes (from a
    closed list: bool, integers, floats, little-endian) and sizes checked; the values are
    the models' ``import_state`` to check. The arrays are read-only views of ``data``
    (``import_state`` copies what it keeps). Raises :class:`CheckpointRejected`."""
    if not data.startswith(STATE_MAGIC):
        raise CheckpointRejected("malformed", "payload is not model state (bad magic bytes)")
    at = len(STATE_MAGIC)
    manifest, at = _json_block(data, at, "manifest")
    index, at = _json_block(data, at, "array index")
    if not isinstance(manifest, dict):
        raise CheckpointRejected("malformed", "manifest is not a JSON object")
    if not isinstance(index, list):
        raise CheckpointRejected("malformed", "array index is not a JSON list")
    body = memoryview(data)[at:]
    arrays: dict[str, np.ndarray] = {}
    for n, entry in enumerate(index):
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)
                and isinstance(entry[1], str) and entry[1] in _DTYPES
                and isinstance(entry[2], list) and len(entry[2]) <= _MAX_DIMS
                and all(_is_int(d) and d < 2**40 for d in entry[2]) and _is_int(entry[3])):
            raise CheckpointRejected("malformed", f"array index entry {n} is not "
                                     "[name, dtype, shape, offset] with a known dtype")
        name, dtype_str, shape, offset = entry
        if name in arrays or len(name) > 200:
            raise CheckpointRejected("malformed", f"array index entry {n}: bad or repeated name")
        dtype = np.dtype(dtype_str)
        count = math.prod(shape)
        if offset + count * dtype.itemsize > len(body):
            raise CheckpointRejected(
                "malformed", f"array {name!r} runs past the end of the payload"
            )
        array = np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape)
        arrays[name] = array
    return manifest, arrays


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _json_block(data: bytes, at: int, what: str) -> tuple[Any, int]:
    """The JSON value in ``data`` at ``at`` (after its 4-byte length) and where it ends."""
    if len(data) < at + 4:
        raise CheckpointRejected("malformed", f"payload ends before its {what}")
    (size,) = struct.unpack(">I", data[at : at + 4])
    at += 4
    if size > _MAX_MANIFEST_BYTES or at + size > len(data):
        raise CheckpointRejected("malformed", f"{what} length {size} does not fit")
    try:
        value = json.loads(data[at : at + size].decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointRejected("malformed", f"{what} is not JSON: {exc}") from None
    return value, at + size


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


# --------------------------------------------------------------------------- envelope


@dataclass(frozen=True, slots=True)
class Opened:
    """A checkpoint that passed every check of the envelope."""

    payload: bytes
    kid: str | None
    app_id: str
    created_ms: int
    #: the signals positions an item-state checkpoint includes (stream.core.signal_positions);
    #: set by :func:`open_models`, None for a checkpoint without them
    replication: Any = None


def seal(payload: bytes, *, keys: KeySet, app_id: str, created_ms: int) -> bytes:
    """``payload`` in the envelope, signed with the first key of ``keys`` (unsigned when
    ``keys`` is empty: only for ``checkpoint_insecure``)."""
    signer = keys.signer()
    header = json.dumps(
        {"format": FORMAT_VERSION, "kid": signer[0] if signer else None, "app_id": app_id,
         "created_ms": int(created_ms), "payload_bytes": len(payload)},
        separators=(",", ":"),
    ).encode("utf-8")
    body = b"".join((MAGIC, struct.pack(">I", len(header)), header, payload))
    if signer is None:
        return body
    return body + hmac.new(signer[1], body, hashlib.sha256).digest()


def open_checkpoint(
    blob: bytes,
    *,
    keys: KeySet,
    app_id: str,
    now_ms: int,
    insecure: bool = False,
    max_age_s: float = 0.0,
    max_bytes: int = 0,
) -> Opened:
    """The checked envelope of ``blob``. With ``keys``, a checkpoint must be signed by one
    of them; without, only ``insecure`` accepts an unsigned one. Raises
    :class:`CheckpointRejected`."""
    if max_bytes and len(blob) > max_bytes:
        raise CheckpointRejected(
            "oversized", f"checkpoint is {len(blob)} bytes, checkpoint_max_bytes is {max_bytes}"
        )
    if blob.startswith(LEGACY_MAGIC):
        raise CheckpointRejected("version", "checkpoint has the old format 1; not read")
    if not blob.startswith(MAGIC):
        if MAGIC.startswith(blob):
            raise CheckpointRejected("truncated", f"checkpoint is only {len(blob)} bytes")
        raise CheckpointRejected("malformed", "not a stream-reco checkpoint (bad magic bytes)")
    at = len(MAGIC)
    if len(blob) < at + 4:
        raise CheckpointRejected("truncated", f"checkpoint is only {len(blob)} bytes")
    (size,) = struct.unpack(">I", blob[at : at + 4])
    at += 4
    if size > _MAX_HEADER_BYTES:
        raise CheckpointRejected("malformed", f"header length {size} exceeds {_MAX_HEADER_BYTES}")
    if len(blob) < at + size:
        raise CheckpointRejected("truncated", "checkpoint ends inside its header")
    header = _header(blob[at : at + size])
    at += size
    version = header.get("format")
    if version != FORMAT_VERSION:
        raise CheckpointRejected(
            "version", f"checkpoint format {version!r}, this worker reads {FORMAT_VERSION}"
        )
    kid, claimed_app = header.get("kid"), header.get("app_id")
    if (not (kid is None or (isinstance(kid, str) and _KID.fullmatch(kid)))
            or not isinstance(claimed_app, str)
            or not _is_int(header.get("payload_bytes")) or not _is_int(header.get("created_ms"))):
        raise CheckpointRejected("malformed", "header fields have the wrong types")
    payload_bytes: int = header["payload_bytes"]
    created_ms: int = header["created_ms"]
    tag_len = 0 if kid is None else _TAG_BYTES
    expected = at + payload_bytes + tag_len
    if len(blob) < expected:
        raise CheckpointRejected(
            "truncated", f"checkpoint is {len(blob)} bytes, its header says {expected}"
        )
    if len(blob) > expected:
        raise CheckpointRejected("malformed", f"{len(blob) - expected} bytes after the end")
    if kid is None:
        if keys:
            raise CheckpointRejected("unsigned", "checkpoint is unsigned; a signed one is required")
        if not insecure:
            raise CheckpointRejected(
                "unsigned", "checkpoint is unsigned and checkpoint_insecure is off"
            )
    else:
        secret = keys.get(kid)
        if secret is None:
            raise CheckpointRejected(
                "unknown_key", f"checkpoint is signed with key id {kid[:64]!r}, not one of "
                f"checkpoint_keys ({', '.join(keys.ids) or 'none set'})"
            )
        body = blob[: expected - _TAG_BYTES]
        mac = hmac.new(secret, body, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, blob[expected - _TAG_BYTES :]):
            raise CheckpointRejected(
                "bad_signature", f"checkpoint signature does not verify with key {kid!r}"
            )
    if claimed_app != app_id:
        raise CheckpointRejected(
            "foreign_app", f"checkpoint is for app {claimed_app[:200]!r}, this worker is {app_id!r}"
        )
    if created_ms > now_ms + FUTURE_SKEW_MS:
        raise CheckpointRejected(
            "future", f"checkpoint is dated {(created_ms - now_ms) / 1000:.0f} s in the future"
        )
    if max_age_s and now_ms - created_ms > max_age_s * 1000:
        raise CheckpointRejected(
            "too_old", f"checkpoint is {(now_ms - created_ms) / 1000:.0f} s old, "
            f"checkpoint_max_age_s is {max_age_s:g}"
        )
    return Opened(blob[at : at + payload_bytes], kid, claimed_app, created_ms)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointRejected("malformed", "checkpoint header is not JSON") from None
    if not isinstance(header, dict):
        raise CheckpointRejected("malformed", "checkpoint header is not a JSON object")
    return header


# --------------------------------------------------------------------------- models


def seal_models(
    recommender: Any, *, keys: KeySet, app_id: str, created_ms: int,
    replication: Any = None,
) -> bytes:
    """A recommender's whole learned state as a checkpoint (see the module docstring).

    With ``replication`` (a :class:`stream.core.signal_positions.Restored`: the signals
    positions the state includes) it is the worker's *item-state* checkpoint: listeners'
    state is left out (it lives in their sessions, the changelog-backed table) and the
    positions go in the manifest, so a restoring worker replays the signals topic from
    them (docs/scaling.md)."""
    if replication is None:
        manifest, arrays = recommender.export_state()
    else:
        manifest, arrays = recommender.export_state(users=False)
        manifest = {**manifest, "replication": replication.to_manifest()}
    return seal(pack_state(manifest, arrays), keys=keys, app_id=app_id,
                created_ms=created_ms)


def open_models(blob: bytes, **checks: Any) -> tuple[Any, Opened]:
    """The recommender in a checkpoint and its envelope; ``checks`` are
    :func:`open_checkpoint`'s keyword arguments. Raises :class:`CheckpointRejected`."""
    from stream.core.recommender import Recommender

    opened = open_checkpoint(blob, **checks)
    try:
        manifest, arrays = unpack_state(opened.payload)
    except CheckpointRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - a case the checks missed: refuse, never crash
        raise CheckpointRejected(
            "malformed", f"payload does not unpack: {type(exc).__name__}: {exc}"
        ) from None
    try:
        recommender = Recommender.import_state(manifest, arrays)
        if manifest.get("replication") is not None:
            from stream.core.signal_positions import Restored

            opened = dataclasses.replace(
                opened, replication=Restored.from_manifest(manifest["replication"]))
    except ValueError as exc:
        raise CheckpointRejected("invalid_state", f"model state: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a case the checks missed: refuse, never crash
        raise CheckpointRejected(
            "invalid_state", f"model state: {type(exc).__name__}: {exc}"
        ) from None
    return recommender, opened


# --------------------------------------------------------------------------- settings


def settings_keys(settings: Any) -> KeySet:
    """The key set of ``checkpoint_keys`` and ``checkpoint_secret`` (validated settings)."""
    return KeySet.parse(settings.checkpoint_keys, settings.checkpoint_secret)


def checkpoint_mode(settings: Any) -> str:
    """``off`` (checkpoint_interval_s is 0), ``signed`` (a key is set), ``insecure``
    (no key, checkpoint_insecure set: unsigned checkpoints) or ``refused`` (no key: the
    worker neither writes nor restores checkpoints)."""
    if not settings.checkpoint_interval_s:
        return "off"
    if settings_keys(settings):
        return "signed"
    return "insecure" if settings.checkpoint_insecure else "refused"


def open_checks(settings: Any, now_ms: int) -> dict[str, Any]:
    """:func:`open_checkpoint`'s keyword arguments for these settings."""
    return {"keys": settings_keys(settings), "app_id": settings.app_id, "now_ms": now_ms,
            "insecure": settings.checkpoint_insecure,
            "max_age_s": settings.checkpoint_max_age_s,
            "max_bytes": settings.checkpoint_max_bytes}
