"""The plays agent's batch bound (stream.processing.pacing.BatchSizer) and the seam's short
fetch wait while a partition's buffer is full (stream.faustx.delivery.drain_messages)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from stream.faustx.delivery import BUFFERED_WAIT_S, drain_messages
from stream.processing.pacing import BatchSizer
from stream.worker.plays import PlaysAgent


def test_the_first_batch_is_bounded_before_any_cost_is_measured() -> None:
    assert BatchSizer(cap=256, budget_s=0.015).limit == BatchSizer.START
    assert BatchSizer(cap=16, budget_s=0.015).limit == 16


def test_the_budget_bounds_the_batch_and_the_size_at_most_doubles() -> None:
    sizer = BatchSizer(cap=256, budget_s=0.015)
    assert sizer.observe(100e-6, 64) == 128  # fits 150, but never more than twice 64
    assert sizer.observe(100e-6, 128) == 150  # 15 ms / 100 us
    cheap = BatchSizer(cap=256, budget_s=0.015)
    assert [cheap.observe(10e-6, n) for n in (64, 128, 256)] == [128, 256, 256]
    # a live lone play, then a backlog: 8, 16, 32, ... (no jump to an unmeasured size)
    assert [cheap.observe(10e-6, n) for n in (1, 8, 16, 32)] == [8, 16, 32, 64]


def test_a_slow_full_batch_cuts_the_next_and_recovery_follows_the_plays() -> None:
    sizer = BatchSizer(cap=256, budget_s=0.015)
    sizer.observe(60e-6, 64)
    sizer.observe(60e-6, 128)
    assert sizer.observe(1e-3, 200) == 15  # a full batch at 1 ms a play: cut at once
    limits = [15]
    for _ in range(12):
        limits.append(sizer.observe(60e-6, limits[-1]))
    assert limits == sorted(limits)  # back up, never in a jump past twice the last
    assert all(b <= 2 * a for a, b in zip(limits, limits[1:], strict=False))
    assert 240 <= limits[-1] <= 250  # 15 ms / (60 us + what is left of the 940 us rise)


def test_one_slow_lone_play_moves_the_estimate_an_eighth() -> None:
    sizer = BatchSizer(cap=256, budget_s=0.015)
    sizer.observe(100e-6, 1)
    sizer.observe(4.6e-3, 1)  # an outlier (a collection, a page fault)
    assert sizer.cost_s == pytest.approx(100e-6 + 4.5e-3 / 8)


def test_the_floor_and_a_cap_below_it() -> None:
    assert BatchSizer(cap=256, budget_s=0.015).observe(1.0, 64) == BatchSizer.FLOOR
    assert BatchSizer(cap=1, budget_s=0.015).observe(1.0, 1) == 1  # one at a time stays so
    assert BatchSizer(cap=4, budget_s=0.015).observe(1e-6, 4) == 4


@pytest.mark.parametrize(("cap", "budget"), [(0, 0.01), (8, 0.0), (8, -1.0)])
def test_bad_bounds_are_refused(cap: int, budget: float) -> None:
    with pytest.raises(ValueError):
        BatchSizer(cap=cap, budget_s=budget)


class _Stop(Exception):
    pass


def _consumer(buffered: set[Any], timeouts: list[float]) -> Any:
    """The attributes of a Faust consumer that drain_messages reads, stopping after the
    first fetch (which records its timeout)."""

    def getmany(timeout: float) -> Any:  # Faust's is an async generator
        timeouts.append(timeout)

        async def records() -> Any:
            raise _Stop
            yield  # an async generator

        return records()

    async def sleep(_: float) -> None:
        return None

    flag = SimpleNamespace(is_set=lambda: False)
    return SimpleNamespace(
        callback=None, getmany=getmany, _stopped=flag, app=SimpleNamespace(
            topics=SimpleNamespace(acks_enabled_for=lambda topic: True)),
        _read_offset={}, diag=SimpleNamespace(set_flag=lambda f: None,
                                              unset_flag=lambda f: None),
        _commit_every=None, fast_delivery=True, rereads={}, reread_count=0, sleep=sleep,
        should_stop=False, consumer_stopped_errors=(), _buffered_partitions=buffered,
        log=SimpleNamespace(exception=lambda *a: None),
    )


@pytest.mark.parametrize(("buffered", "expected"), [(set(), 1.0), ({"tp0"}, BUFFERED_WAIT_S)])
def test_a_fetch_waits_briefly_while_a_partition_is_out_for_a_full_buffer(
    buffered: set[Any], expected: float
) -> None:
    # Faust fixes a fetch's partitions when it starts and waits 1 s: a partition whose
    # buffer drained meanwhile waited the whole second (a 0.4-1 s pause in P1 drains)
    timeouts: list[float] = []
    fetcher = SimpleNamespace(_stopped=SimpleNamespace(is_set=lambda: False))
    with pytest.raises(_Stop):
        asyncio.run(drain_messages(_consumer(buffered, timeouts), fetcher))
    assert timeouts == [expected]


def test_the_agent_bounds_its_next_batch_by_the_step_it_just_took() -> None:
    """PlaysAgent.apply feeds the loop's own CPU per play of the whole step (records,
    processing, hand-on, acks) to its sizer, and gathers no more than the limit next."""
    import time

    def burn(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    def process_batch(records: Any, stages: Any, before: Any) -> list[Any]:
        burn(0.002 * len(records))  # 2 ms of CPU a play
        return []

    async def nothing(*args: Any) -> None:
        return None

    stream = SimpleNamespace(set_current_event=lambda ev: None)
    agent: Any = SimpleNamespace(
        stream=stream, turns=None, freeze_fence=None,
        _live=lambda s, events: (events, events, {}), _pace=lambda live, now: None,
        processor=SimpleNamespace(process_batch=process_batch), _hand_on=nothing,
        _ack=lambda s, live: burn(0.001 * len(live)),  # 1 ms a play in the acks
        stall_watch=SimpleNamespace(progress=lambda now: None), _after=nothing,
        sizer=BatchSizer(cap=256, budget_s=0.015), max_batch=64,
    )
    asyncio.run(PlaysAgent.apply(agent, list(range(10))))
    assert agent.sizer.cost_s >= 0.003  # processing and acks, not processing alone
    assert agent.max_batch == BatchSizer.FLOOR  # 15 ms / 3 ms = 5: the floor
