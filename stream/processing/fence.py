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
offset. Until the first record read again arrives, the partition's records are ones that
were already on their way before that seek (the consumer marks the first one it fetched
after the seek, :meth:`~stream.faustx.consumer.SeamConsumer.first_after_reread`): they are
not applied either (:data:`WAIT`), and come again after it. The first record read again
starts the partition's order afresh: if it lies past the expected offset, nothing is in
between (transaction markers, a compacted range, or a log start that moved past it), and
:attr:`OffsetFence.absent` counts those offsets. Reading again cannot loop: one hole causes
one seek, and its first record read again always passes.

>>> fence = OffsetFence()
>>> fence.reset({"p0": 336}, epoch=1)
>>> fence.admit("p0", 336), fence.admit("p0", 337)
(None, None)
>>> fence.admit("p0", 2213)  # 338..2212 never came: read again from 338
338
>>> fence.admit("p0", 2214, fresh=False)  # on its way before that seek: wait
-1
>>> fence.admit("p0", 338), fence.admit("p0", 339)  # read again: in order
(None, None)
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Final

#: :meth:`OffsetFence.admit`'s answer for a record that was on its way before its partition
#: was sought again: do not apply it (nor ack it), and do not read again (it comes again)
WAIT: Final = -1


class OffsetFence:
    """Per partition: the next offset the stream must deliver (see the module docstring)."""

    __slots__ = ("epoch", "_next", "rereading", "absent")

    def __init__(self) -> None:
        #: the consumer's seek count the fence was last reset for (None: never)
        self.epoch: int | None = None
        self._next: dict[Hashable, int] = {}
        #: partition -> the offset it is being read again from, until a record read again came
        self.rereading: dict[Hashable, int] = {}
        #: offsets that a read again showed to be absent (first record read again was past them)
        self.absent = 0

    def reset(self, starts: Mapping[Hashable, int | None], epoch: int) -> None:
        """The stream was sought: each partition starts at ``starts[tp]`` (None: unknown,
        the fence lets that partition's first record through)."""
        self._next = {tp: offset for tp, offset in starts.items() if offset is not None}
        self.rereading.clear()
        self.epoch = epoch

    def admit(self, tp: Hashable, offset: int, fresh: bool = True) -> int | None:
        """None: apply the record at ``offset``. :data:`WAIT`: do not apply it, it was on
        its way before the partition was sought again (``fresh`` False: the caller knows the
        first record read again, and this is not it). An offset: a hole -- the records from
        that offset up to this one were never delivered; do not apply this one (nor ack it),
        and read the partition again from the offset returned."""
        pending = self.rereading.get(tp)
        if pending is not None:
            if not fresh:
                return WAIT
            del self.rereading[tp]  # the first record read again: the order starts afresh
            if offset > pending:
                self.absent += offset - pending
            self._next[tp] = offset + 1
            return None
        expected = self._next.get(tp)
        if expected is None or offset == expected:
            self._next[tp] = offset + 1
            return None
        if offset < expected:  # delivered again (a seek back): the offset order holds
            return None
        self.rereading[tp] = expected
        return expected
