"""When the listeners waiting for a new list are ranked (the pipeline's decision; the
worker's ranker asks :meth:`RankPacing.due` before each ranking pass).

Normally at once: every pass ranks everyone pending. While a real backlog is being drained
(a partition ``CATCH_UP_PLAYS`` or more behind at the last batch), a listener's rankings are
coalesced over up to ``hold_s`` (``catch_up_rank_ms``): their plays come back to back then,
and each list would be replaced within milliseconds (at 200 ms, 0.42 rankings per play
instead of 0.72 in a P1 drain, ~10 % more plays/s). A play waits at least ~250 ms in such a
backlog anyway.

>>> pacing = RankPacing(hold_s=0.2)
>>> pacing.batch_applied(now=10.0, nothing_pending=True, backlog=True)
>>> pacing.due(10.1), pacing.due(10.3)
(False, True)
"""

from __future__ import annotations

from typing import Final

#: a partition this many plays behind is a backlog being drained: rankings are coalesced
CATCH_UP_PLAYS: Final = 256


class RankPacing:
    """Holds rankings back while a backlog drains (see the module docstring)."""

    __slots__ = ("hold_s", "backlog", "waiting_since")

    def __init__(self, hold_s: float) -> None:
        if hold_s < 0:
            raise ValueError(f"hold_s must be >= 0, got {hold_s!r}")
        self.hold_s = hold_s
        #: a real backlog waits (CATCH_UP_PLAYS behind on a partition at the last batch)
        self.backlog = False
        #: when the listeners waiting to be ranked started waiting (a monotonic clock)
        self.waiting_since = 0.0

    def batch_applied(self, now: float, nothing_pending: bool, backlog: bool) -> None:
        """A batch of plays is about to be applied at ``now``; ``nothing_pending``: no
        listener waited for a ranking before it; ``backlog``: a partition is
        ``CATCH_UP_PLAYS`` or more behind it."""
        if nothing_pending:
            self.waiting_since = now
        self.backlog = backlog

    def held_for(self, now: float) -> float:
        """How much longer the pending listeners are held back (0: rank them now)."""
        if not self.backlog:
            return 0.0
        return max(0.0, self.waiting_since + self.hold_s - now)

    def due(self, now: float) -> bool:
        """Whether the pending listeners are ranked now."""
        return self.held_for(now) <= 0.0


class BatchSizer:
    """How many plays the agent's next batch may gather: ``cap``, or fewer once the recent
    batches' cost per play says more would not fit in ``budget_s``. A batch is one step of
    the event loop, so its plays times their cost is how long it holds the loop (the turn
    budget can only make a step wait, not cut it).

    The cost is what was measured, so the bound holds at the recent cost: a step of plays
    that suddenly cost more (hostile ids, cold caches) runs over it once, and the next is
    cut. Two guards keep that overrun small. A batch may be at most twice the last one
    (from ``START`` plays after a start), so an unmeasured batch size is never
    extrapolated far. The estimate moves towards a batch's cost by ``plays / RISE`` of
    the difference when it rose, and by ``plays / FALL`` when it fell (at most all of it):
    a single slow lone play moves it an eighth, a full batch all the way.

    >>> sizer = BatchSizer(cap=256, budget_s=0.015)
    >>> sizer.limit, sizer.observe(100e-6, 64), sizer.observe(100e-6, 128)
    (64, 128, 150)
    >>> sizer.observe(1e-3, 150), sizer.observe(100e-6, 15)
    (15, 19)
    """

    __slots__ = ("cap", "budget_s", "floor", "cost_s", "limit")

    #: the fewest plays a batch may gather while the budget bounds it (``cap`` if lower)
    FLOOR: Final = 8
    #: the first batch's bound (``cap`` if lower)
    START: Final = 64
    #: plays that move the estimate all the way to a batch's cost, when it rose / fell
    RISE: Final = 8
    FALL: Final = 64

    def __init__(self, cap: int, budget_s: float) -> None:
        if cap < 1 or budget_s <= 0:
            raise ValueError(f"cap must be >= 1 and budget_s > 0, got {cap!r}, {budget_s!r}")
        self.cap = cap
        self.budget_s = budget_s
        self.floor = min(cap, self.FLOOR)
        #: seconds per play of the recent batches (0: none measured yet)
        self.cost_s = 0.0
        self.limit = min(cap, self.START)

    def observe(self, per_play_s: float, plays: int) -> int:
        """A batch of ``plays`` took ``per_play_s`` per play; returns the next limit."""
        cost = self.cost_s
        if cost <= 0:
            cost = per_play_s
        else:
            weight = min(1.0, plays / (self.RISE if per_play_s > cost else self.FALL))
            cost += (per_play_s - cost) * weight
        self.cost_s = cost
        fits = int(self.budget_s / cost) if cost > 0 else self.cap
        self.limit = min(self.cap, max(self.floor, min(fits, 2 * plays)))
        return self.limit
