"""The ranker ranks one budgeted pass per turn of the event loop (the rest of the loop's
work runs between two passes)."""

from __future__ import annotations

import asyncio
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
