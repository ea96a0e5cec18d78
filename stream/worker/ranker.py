"""The ranker part: turns the pipeline's pending listeners into lists for the writer.

The plays agent applies a batch and wakes the ranker; the ranker asks the pipeline's pacing
whether rankings are due (:class:`stream.processing.pacing.RankPacing`: held back while a
backlog drains), ranks a chunk of the pending listeners per pass (about RANK_BUDGET_S of
ranking: :meth:`stream.processing.pipeline.Processor.rank_pending`, which submits their lists;
it wakes itself again while listeners wait) and
sends what the pass has for other parts to hand on (track signals, catalogue changes). It
ranks only while no Redis round trip is in flight: the listeners that played meanwhile are
ranked together when the writer can take their lists, so one pass, one flush.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from stream.processing.pacing import RankPacing
from stream.processing.pipeline import Processor
from stream.worker.telemetry import Telemetry
from stream.worker.watchdog import TurnBudget
from stream.worker.writer import WriterPart

logger = logging.getLogger(__name__)

#: one ranking pass ranks about this much (seconds of ranking) at a time
#: (stream.processing.pipeline.Processor.rank_pending); the rest waits for the next pass,
#: for which the ranker wakes itself at once
RANK_BUDGET_S = 0.015


class Ranker:
    """Ranks pending listeners when woken (see the module docstring)."""

    def __init__(
        self,
        processor: Processor,
        pacing: RankPacing,
        writer: WriterPart,
        telemetry: Telemetry,
        models_busy: Callable[[], bool],
        after_ranking: Sequence[Callable[[], None]],
        turns: TurnBudget | None = None,
    ) -> None:
        self.processor = processor
        self.pacing = pacing
        self.writer = writer
        self.telemetry = telemetry
        self.models_busy = models_busy
        #: what each ranking pass hands on (track signals, catalogue changes)
        self.after_ranking = after_ranking
        #: the loop turn's budget shared with the plays agent (None: no sharing)
        self.turns = turns
        self._wake = asyncio.Event()
        self._rewake: asyncio.TimerHandle | None = None

    def wake(self) -> None:
        """Listeners may be waiting for a ranking (a batch was applied, an eviction ended)."""
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            await self.writer.ready()
            self._wake.clear()
            held = self.pacing.held_for(time.perf_counter())
            if held > 0:  # the agent's next batch wakes it too; this covers a last batch
                if self._rewake is None:
                    self._rewake = loop.call_later(held, self._wake_again)
                continue
            try:
                await self._pass()
            except Exception:  # noqa: BLE001 - never let one pass stop the ranking
                logger.exception("ranking pass failed")
            # one pass per loop turn: the pass re-set the wake event if listeners still
            # wait, and the writer is still "ready" (its flush of this pass's lists has not
            # started), so without this the next pass ran at once, and so on until nobody
            # waited: the junk-ids drill saw 157 ms of ranking in one turn of the loop
            await asyncio.sleep(0)

    async def _pass(self) -> None:
        """:meth:`rank_due` with each of its two steps (the ranking, then what it hands on:
        the signals publisher's flush) started in a loop turn with room for it
        (:class:`stream.worker.watchdog.TurnBudget`)."""
        turns = self.turns
        if turns is None:
            self.rank_due()
            return
        await turns.room()
        if self.rank_step() is None:
            return
        await turns.room()
        self.hand_on()

    def _wake_again(self) -> None:
        self._rewake = None
        self.wake()

    def rank_due(self) -> int:
        """Rank the pending listeners unless an eviction is changing the models (it wakes
        the ranker when it is done); returns how many were ranked."""
        ranked = self.rank_step()
        if ranked is None:
            return 0
        self.hand_on()
        return ranked

    def rank_step(self) -> int | None:
        """One budgeted ranking (None: not now, an eviction is changing the models)."""
        if self.models_busy():
            return None
        # bounded work per loop turn: the rest waits for the next pass (woken at once)
        ranked = self.processor.rank_pending(on_ranked=self.telemetry.observe_ranking,
                                             budget_s=RANK_BUDGET_S)
        if self.processor.rank_waiting():
            self.wake()
        return ranked

    def hand_on(self) -> None:
        """What a ranking pass hands on (track signals, catalogue changes)."""
        for hand_on in self.after_ranking:
            hand_on()
