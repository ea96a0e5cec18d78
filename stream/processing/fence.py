"""Plays are applied in offset order from where the stream was sought to, per partition:
:class:`OffsetFence`.

Why (docs/reliability.md, "The crash-loop loss of session 10"): a restarted worker whose
event loop was held for longer than its session timeout lost its group membership, rejoined
with no committed offset, and its stream then started near the partitions' high-water mark:
1,900 plays per partition were never delivered to the agent. The agent applied what came,
Faust committed past the hole (its own hole check is skipped while a partition has no
committed offset), and the listeners' offset guards then counted the skipped plays as
replays: 4,512 plays lost with the final worker at lag 0.

The fence knows where each partition's stream starts after a seek (the committed offset, or
the partition's earliest offset when there is none: :class:`stream.faustx.consumer.SeamConsumer`
records both) and what it has let through since. A record beyond the next expected offset is
a hole: it is not applied (nor acked), and the partition is read again from the expected
offset. If reading again meets the same hole, nothing is there (transaction markers, a
compacted range): the record is let through. Reading again is bounded: after
:data:`MAX_REREADS` attempts from the same offset that still meet a hole (the log start moved
past it, or Faust's fetch loop kept delivering records fetched before the seek), the fence
gives up, lets the record through and counts it in :attr:`OffsetFence.gave_up`, so a
partition never stalls on the fence (the worker logs an ERROR; the skipped plays may be lost,
as they were before the fence existed). Known limit (docs/reliability.md): a seek does not
update Faust's per-partition read offset and gap bookkeeping, so reading again is best-effort.

>>> fence = OffsetFence()
>>> fence.reset({"p0": 336}, epoch=1)
>>> fence.admit("p0", 336), fence.admit("p0", 337)
(None, None)
>>> fence.admit("p0", 2213)  # 338..2212 never came: read again from 338
338
>>> fence.admit("p0", 338), fence.admit("p0", 339)  # read again: in order
(None, None)
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Final

#: attempts to read a partition again from one offset before the fence gives up
MAX_REREADS: Final = 3


class OffsetFence:
    """Per partition: the next offset the stream must deliver (see the module docstring)."""

    __slots__ = ("epoch", "_next", "_holes", "gave_up")

    def __init__(self) -> None:
        #: the consumer's seek count the fence was last reset for (None: never)
        self.epoch: int | None = None
        self._next: dict[Hashable, int] = {}
        #: partition -> (expected, found, attempts) of the hole being read again
        self._holes: dict[Hashable, tuple[int, int, int]] = {}
        #: holes let through after MAX_REREADS attempts (each one: plays possibly lost)
        self.gave_up = 0

    def reset(self, starts: Mapping[Hashable, int | None], epoch: int) -> None:
        """The stream was sought: each partition starts at ``starts[tp]`` (None: unknown,
        the fence lets that partition's first record through)."""
        self._next = {tp: offset for tp, offset in starts.items() if offset is not None}
        self._holes.clear()
        self.epoch = epoch

    def admit(self, tp: Hashable, offset: int) -> int | None:
        """None: apply the record at ``offset``. An offset: a hole -- the records from that
        offset up to this one were never delivered; do not apply this one (nor ack it), and
        read the partition again from the offset returned."""
        expected = self._next.get(tp)
        if expected is None or offset == expected:
            self._next[tp] = offset + 1
            self._holes.pop(tp, None)
            return None
        if offset < expected:  # delivered again (a seek back): the offset order holds
            return None
        hole = self._holes.get(tp)
        if hole is not None and hole[0] == expected:
            if hole[1] == offset:
                # read again and the same record came first: nothing is in between
                self._next[tp] = offset + 1
                del self._holes[tp]
                return None
            if hole[2] >= MAX_REREADS:  # still a hole after reading again: give up
                self._next[tp] = offset + 1
                del self._holes[tp]
                self.gave_up += 1
                return None
            self._holes[tp] = (expected, offset, hole[2] + 1)
            return expected
        self._holes[tp] = (expected, offset, 1)
        return expected
