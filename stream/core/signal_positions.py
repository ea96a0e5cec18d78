"""Where a worker's item state stands in the signals topic: what a checkpoint includes, and
which signals a restored worker must still apply (no gap, no double count).

Every worker is one *incarnation* (a fresh id per process start). Each signal carries
its sender's number for the play (the recommender's ``n_learned`` after learning it,
:attr:`stream.core.recommender.ItemStep.seq`). A worker's item state at any instant includes:

- every other sender's signal at an offset below its read position, per signals
  partition (the reader applies a record and moves past it with no await between), and
- every play it learned itself: exactly its signals numbered up to its ``n_learned``,
  whether or not they were sent yet.

So a checkpoint records ``{"writer": incarnation, "writer_seq": n_learned, "offsets":
{partition: next offset to read}}`` (:meth:`SignalPositions.checkpoint`), taken at the
instant the state is snapshot. A worker restoring it reads each signals partition from
the recorded offset (the beginning of a partition the checkpoint did not know) and applies
every signal except the writer's own numbered up to ``writer_seq`` (already in the state)
and its own current incarnation's (learned locally). Offsets below the recorded ones were
applied by the writer before the snapshot; the writer's signals numbered after
``writer_seq`` were learned after it, so they are produced after it too, at or past the
offsets. Pure: no I/O.

>>> pos = SignalPositions("w-new", restored=Restored("w-old", 7, {0: 120, 1: 98}))
>>> pos.start_offset(0), pos.start_offset(2)
(120, 0)
>>> pos.should_apply("w-old", 7), pos.should_apply("w-old", 8), pos.should_apply("w-new", 1)
(False, True, False)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

#: the manifest entry of a checkpoint that holds its signals positions
MANIFEST_KEY: Final = "replication"
MAX_PARTITIONS: Final = 100_000
MAX_WORKER_ID_LEN: Final = 64


@dataclass(frozen=True, slots=True)
class Restored:
    """What a restored checkpoint included: its writer incarnation, the last message
    number that writer had sent, and the next offset to read per signals partition."""

    writer: str
    writer_seq: int
    offsets: Mapping[int, int]

    def to_manifest(self) -> dict[str, Any]:
        return {"writer": self.writer, "writer_seq": self.writer_seq,
                "offsets": {str(p): o for p, o in sorted(self.offsets.items())}}

    @classmethod
    def from_manifest(cls, data: object) -> Restored:
        """Validated (a checkpoint is untrusted input until checked): ValueError names
        the bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"{MANIFEST_KEY}: expected an object")
        writer = data.get("writer")
        if type(writer) is not str or not 0 < len(writer) <= MAX_WORKER_ID_LEN:
            raise ValueError(f"{MANIFEST_KEY}.writer: expected a worker id")
        seq = data.get("writer_seq")
        if type(seq) is not int or seq < 0:
            raise ValueError(f"{MANIFEST_KEY}.writer_seq: expected an integer >= 0")
        raw = data.get("offsets")
        if not isinstance(raw, dict) or len(raw) > MAX_PARTITIONS:
            raise ValueError(f"{MANIFEST_KEY}.offsets: expected partition -> offset")
        offsets: dict[int, int] = {}
        for p, o in raw.items():
            if type(p) is not str or not p.isdigit() or len(p) > 6:
                raise ValueError(f"{MANIFEST_KEY}.offsets: bad partition {p!r}")
            if type(o) is not int or o < 0:
                raise ValueError(f"{MANIFEST_KEY}.offsets[{p}]: expected an offset >= 0")
            offsets[int(p)] = o
        return cls(writer, seq, offsets)


@dataclass(slots=True)
class SignalPositions:
    """One worker incarnation's positions in the signals topic (see the module)."""

    worker: str
    restored: Restored | None = None
    #: next offset to read per signals partition (advanced past every record handled)
    offsets: dict[int, int] = field(default_factory=dict)
    #: signals skipped because the restored checkpoint already held them
    skipped_restored: int = 0

    def __post_init__(self) -> None:
        if self.restored is not None and not self.offsets:
            self.offsets = dict(self.restored.offsets)

    def start_offset(self, partition: int) -> int | None:
        """Where to start reading ``partition``: the restored offset, 0 for a partition
        the checkpoint did not know, None (the end) without a restored checkpoint."""
        if self.restored is None:
            return None
        return self.restored.offsets.get(partition, 0)

    def should_apply(self, sender: str, seq: int) -> bool:
        """Whether a signal from ``sender`` numbered ``seq`` (-1: unnumbered) still has to
        be applied to this worker's item state."""
        if sender == self.worker:
            return False  # learned locally
        r = self.restored
        if r is not None and sender == r.writer and 0 <= seq <= r.writer_seq:
            self.skipped_restored += 1
            return False  # already in the restored checkpoint
        return True

    def handled(self, partition: int, offset: int) -> None:
        """The record at ``offset`` is applied (or rejected for good): read past it."""
        if offset + 1 > self.offsets.get(partition, 0):
            self.offsets[partition] = offset + 1

    def checkpoint(self, n_learned: int) -> Restored:
        """What a snapshot taken now includes: call it in the same instant as the
        snapshot, with the snapshot recommender's ``n_learned``."""
        return Restored(self.worker, n_learned, dict(self.offsets))
