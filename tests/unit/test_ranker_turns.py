"""The ranker ranks one budgeted pass per turn of the event loop (the rest of the loop's
work runs between two passes)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from typing import Any

from stream.processing.pacing import RankPacing
from stream.worker.ranker import Ranker


class _Processor:
    def __init__(self, waiting: int, log: list[Any]) -> None:
        self.waiting = waiting
        self.log = log

    def rank_pending(self, on_ranked: Any = None, budget_s: float | None = None) -> int:
        assert budget_s is not None  # always budgeted
        self.waiting -= 1  # one listener per pass
        self.log.append("pass")
        return 1

    def rank_waiting(self) -> bool:
        return self.waiting > 0


class _Telemetry:
    def observe_ranking(self, seconds: float) -> None:
        pass


class _Writer:
    async def ready(self) -> None:  # never a round trip in flight: always ready
        return None


def test_one_ranking_pass_per_loop_turn_while_listeners_wait() -> None:
    log: list[Any] = []
    processor = _Processor(20, log)
    ranker = Ranker(processor, RankPacing(hold_s=0.0), _Writer(), _Telemetry(),  # type: ignore[arg-type]
                    models_busy=lambda: False, after_ranking=())

    async def other() -> None:
        while True:
            log.append("other")
            await asyncio.sleep(0)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        side = loop.create_task(other())
        task = loop.create_task(ranker.run())
        await asyncio.sleep(0)
        ranker.wake()
        for _ in range(200):
            if not processor.rank_waiting():
                break
            await asyncio.sleep(0)
        task.cancel()
        side.cancel()

    asyncio.run(main())
    passes = [i for i, e in enumerate(log) if e == "pass"]
    assert len(passes) == 20
    # other work ran between every two passes
    assert all("other" in log[a:b] for a, b in zip(passes, passes[1:], strict=False))


def _burn(seconds: float) -> None:
    """Hold the loop's thread for ``seconds`` of its own CPU (machine load cannot shorten
    or lengthen it: ``time.thread_time``)."""
    import time

    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class _BurningProcessor(_Processor):
    def rank_pending(self, on_ranked: Any = None, budget_s: float | None = None) -> int:
        _burn(0.015)  # a ranking pass near its 15 ms budget
        return super().rank_pending(on_ranked, budget_s)


def test_the_agents_batch_the_ranking_and_its_hand_on_share_one_budget_per_loop_turn(
) -> None:
    """Session 13's overload: a batch of plays, a ranking pass and the signals flush it
    hands on were ready at once and ran in one loop turn (50-72 ms of the loop's own work),
    although each was bounded. With a shared TurnBudget each step starts in a turn with
    room: the loop's own work between two wake-ups of the lag probe stays near one step."""
    from stream.worker.watchdog import LoopLagProbe, TurnBudget

    log: list[Any] = []
    processor = _BurningProcessor(12, log)
    turns = TurnBudget(0.01)
    ranker = Ranker(processor, RankPacing(hold_s=0.0), _Writer(), _Telemetry(),  # type: ignore[arg-type]
                    models_busy=lambda: False,
                    after_ranking=(lambda: _burn(0.015),),  # a flush of 1,000 signals
                    turns=turns)
    probe = LoopLagProbe(on_lag=lambda s: None, interval_s=0.005, turns=turns)
    busy: list[float] = []
    probe.on_busy = busy.append

    async def agent() -> None:  # the plays agent: a batch per step, in a turn with room
        for _ in range(12):
            await turns.room()
            _burn(0.015)
            log.append("batch")
            ranker.wake()
            await asyncio.sleep(0)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        watch = loop.create_task(probe.run())
        task = loop.create_task(ranker.run())
        await asyncio.sleep(0.02)
        await loop.create_task(agent())
        for _ in range(400):
            if not processor.rank_waiting():
                break
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)
        task.cancel()
        watch.cancel()

    # no cyclic collection inside a measured turn: after the rest of the unit suite the
    # heap is large, and one full collection (tens of ms) failed this once in a full run
    gc.collect()
    gc.disable()
    try:
        asyncio.run(main())
    finally:
        gc.enable()
    assert log.count("batch") == 12 and log.count("pass") >= 12
    # one 15 ms step per turn (plus the probe's and the test's own few ms), never two or
    # three steps back to back (30-45 ms)
    assert max(busy) < 0.026, sorted(busy)[-5:]
    assert turns.waits > 0


def test_a_freeze_while_the_agent_waits_for_a_turn_is_fenced_before_its_batch() -> None:
    """The agent checks the freeze fence after waiting for a turn (review of session 14):
    a wall-clock freeze (a descheduled thread, another thread holding the GIL) by a part
    that ran first in the new turn used no loop CPU, so the turn still has room, and the
    batch must not be applied as if nothing happened."""
    import time
    from types import SimpleNamespace

    from stream.worker.fencing import FreezeFence
    from stream.worker.plays import PlaysAgent
    from stream.worker.watchdog import LoopLagProbe, TurnBudget

    events: list[str] = []

    class Applied(Exception):
        pass

    fence = FreezeFence(0.4, holds_partitions=lambda: True,
                        on_fenced=lambda gap: events.append("fenced"))
    turns = TurnBudget(0.02)
    probe = LoopLagProbe(on_lag=lambda s: None, interval_s=0.01, fence=fence, turns=turns)

    def live(stream: Any, batch: Any) -> Any:
        events.append("applied")
        raise Applied

    agent = SimpleNamespace(stream=object(), freeze_fence=fence, turns=turns, _live=live)

    async def other_part() -> None:  # e.g. the ranker, waiting for the same turn first
        await turns.room()
        time.sleep(0.3)  # a 300 ms freeze of the wall clock (fence limit 200 ms), no CPU

    async def main() -> None:
        probing = asyncio.ensure_future(probe.run())
        await asyncio.sleep(0.025)
        end = time.thread_time() + 0.025
        while time.thread_time() < end:  # the turn's budget is spent: both wait
            pass
        other = asyncio.ensure_future(other_part())
        await asyncio.sleep(0)
        with contextlib.suppress(Applied):
            await PlaysAgent.apply(agent, [])  # type: ignore[arg-type]
        await other
        probing.cancel()

    asyncio.run(main())
    assert events and events[0] == "fenced", events
