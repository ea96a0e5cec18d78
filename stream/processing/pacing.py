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
    budget can only make a step wait, not cut it). A slower batch lowers the bound at once
    (hostile ids, cold caches, a loaded machine); faster ones raise it slowly (a tenth of
    the difference per batch).

    >>> sizer = BatchSizer(cap=256, budget_s=0.015)
    >>> sizer.limit, sizer.observe(0.0001), sizer.observe(0.001), sizer.observe(0.00005)
    (256, 150, 15, 16)
    """

    __slots__ = ("cap", "budget_s", "floor", "cost_s", "limit")

    #: the fewest plays a batch may gather while the budget bounds it (``cap`` if lower)
    FLOOR: Final = 8

    def __init__(self, cap: int, budget_s: float) -> None:
        if cap < 1 or budget_s <= 0:
            raise ValueError(f"cap must be >= 1 and budget_s > 0, got {cap!r}, {budget_s!r}")
        self.cap = cap
        self.budget_s = budget_s
        self.floor = min(cap, self.FLOOR)
        #: seconds per play of the recent batches (0: none measured yet)
        self.cost_s = 0.0
        self.limit = cap

    def observe(self, per_play_s: float) -> int:
        """A batch took ``per_play_s`` per play; returns the next batches' limit."""
        cost = self.cost_s
        cost = per_play_s if per_play_s >= cost else cost + (per_play_s - cost) * 0.1
        self.cost_s = cost
        fits = int(self.budget_s / cost) if cost > 0 else self.cap
        self.limit = min(self.cap, max(self.floor, fits))
        return self.limit
