"""Message authentication between workers and operators: HMAC-SHA256 with key ids.

Track signals (worker -> workers, :mod:`stream.processing.replication`) and control commands
(operator -> worker, :mod:`stream.processing.control`) travel on Kafka topics that anyone with
produce rights could write. Each such record carries two headers::

    auth.kid   the id of the key that signed it
    auth.mac   hex HMAC-SHA256 over (purpose, topic, record key, record value)

The MAC binds the record to its purpose (a signal cannot pass as a control command), its
topic (one app's records do not verify on another app's topics unless they share keys) and
its Kafka key (a signed forget cannot be re-keyed onto another partition).

Keys come from one setting (``worker_keys``) as ``kid:secret[,kid:secret...]``: the
**first** key signs, every key verifies -- rotate by prepending a new key to every
worker and the operators' tools, then dropping the old one once nothing signed with it is
in flight. Pure: no I/O.

>>> ring = KeyRing.parse("k2:0123456789abcdef0123,k1:fedcba9876543210fedc")
>>> headers = ring.sign(b"signals", "app-track-signals", b"w1", b"{}")
>>> [h[0] for h in headers]
['auth.kid', 'auth.mac']
>>> ring.verify(headers, b"signals", "app-track-signals", b"w1", b"{}") is None
True
>>> ring.verify(headers, b"signals", "app-track-signals", b"w1", b"{ }")
'bad_signature'
>>> ring.verify([], b"signals", "app-track-signals", b"w1", b"{}")
'unsigned'
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

KID_HEADER: Final = "auth.kid"
MAC_HEADER: Final = "auth.mac"
#: domain separation: a MAC made by this scheme is never valid for another use of the key
_DOMAIN: Final = b"stream-reco/auth/v1"
_KID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,32}")
#: a shorter secret is refused at start-up (16 bytes = 128 bits of a random hex string: 32)
MIN_SECRET_LEN: Final = 16

#: why a record failed authentication (closed set: used as a metric label)
AUTH_REASONS: Final = ("unsigned", "unknown_key", "bad_signature")


class KeySettingError(ValueError):
    """A malformed key setting (the message says what is wrong, never the secret)."""


@dataclass(frozen=True, slots=True)
class KeyRing:
    """Named secrets; ``keys[0]`` signs, any verifies. An empty ring signs nothing and
    verifies nothing."""

    keys: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def parse(cls, text: str) -> KeyRing:
        """``kid:secret[,kid:secret...]`` (whitespace around entries ignored); raises
        :class:`ValueError` naming the entry's position (never the secret)."""
        keys: list[tuple[str, bytes]] = []
        for i, entry in enumerate(part.strip() for part in text.split(",")):
            if not entry:
                if text.strip():
                    raise KeySettingError(f"entry {i + 1} is empty (expected kid:secret)")
                continue
            kid, sep, secret = entry.partition(":")
            if not sep:
                raise KeySettingError(f"entry {i + 1} has no ':' (expected kid:secret)")
            if not _KID_RE.fullmatch(kid):
                raise KeySettingError(f"entry {i + 1}: key id must be 1-32 of [A-Za-z0-9._-]")
            if len(secret) < MIN_SECRET_LEN:
                raise KeySettingError(
                    f"entry {i + 1} (key id {kid!r}): secret must be at least "
                    f"{MIN_SECRET_LEN} characters"
                )
            if any(kid == k for k, _ in keys):
                raise KeySettingError(f"entry {i + 1}: key id {kid!r} appears twice")
            keys.append((kid, secret.encode()))
        return cls(tuple(keys))

    def __bool__(self) -> bool:
        return bool(self.keys)

    @property
    def signing_kid(self) -> str | None:
        return self.keys[0][0] if self.keys else None

    def sign(
        self, purpose: bytes, topic: str, key: bytes | None, value: bytes
    ) -> list[tuple[str, bytes]]:
        """The headers that authenticate this record (none with an empty ring)."""
        if not self.keys:
            return []
        kid, secret = self.keys[0]
        mac = _mac(secret, purpose, topic, key, value)
        return [(KID_HEADER, kid.encode()), (MAC_HEADER, mac.encode())]

    def verify(
        self,
        headers: Iterable[tuple[str, bytes]] | Mapping[str, bytes] | None,
        purpose: bytes,
        topic: str,
        key: bytes | None,
        value: bytes | None,
    ) -> str | None:
        """None if the record is authentic, else why not (one of :data:`AUTH_REASONS`)."""
        found = _auth_headers(headers)
        if found is None:
            return "unsigned"
        kid, mac = found
        secret = next((s for k, s in self.keys if k == kid), None)
        if secret is None:
            return "unknown_key"
        expected = _mac(secret, purpose, topic, key, value or b"")
        if not hmac.compare_digest(expected.encode(), mac):
            return "bad_signature"
        return None


def _auth_headers(
    headers: Iterable[tuple[str, bytes]] | Mapping[str, bytes] | None,
) -> tuple[str, bytes] | None:
    if not headers:
        return None
    items = headers.items() if isinstance(headers, Mapping) else headers
    kid = mac = None
    for name, raw in items:
        if name == KID_HEADER and kid is None:
            kid = bytes(raw or b"")[:64].decode("ascii", "replace")
        elif name == MAC_HEADER and mac is None:
            mac = bytes(raw or b"")[:128]
    if kid is None or mac is None:
        return None
    return kid, mac


def _mac(secret: bytes, purpose: bytes, topic: str, key: bytes | None, value: bytes) -> str:
    h = hmac.new(secret, digestmod=hashlib.sha256)
    for part in (_DOMAIN, purpose, topic.encode(), b"\xff" if key is None else b"\x00" + key):
        # length-prefixed: no two different tuples feed the same bytes to the MAC
        h.update(struct.pack(">I", len(part)))
        h.update(part)
    h.update(value)
    return h.hexdigest()
