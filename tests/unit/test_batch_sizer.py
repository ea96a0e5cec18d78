"""The plays agent's batch bound (stream.processing.pacing.BatchSizer) and the seam's short
fetch wait while a partition's buffer is full (stream.faustx.delivery.drain_messages)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from stream.faustx.delivery import BUFFERED_WAIT_S, drain_messages
from stream.processing.pacing import BatchSizer


def test_the_cap_holds_until_a_batch_is_measured() -> None:
    assert BatchSizer(cap=256, budget_s=0.015).limit == 256


def test_the_budget_bounds_the_batch() -> None:
    sizer = BatchSizer(cap=256, budget_s=0.015)
    assert sizer.observe(100e-6) == 150  # 15 ms / 100 us
    assert BatchSizer(cap=256, budget_s=0.015).observe(10e-6) == 256  # cheap: the cap


def test_a_slow_batch_lowers_the_bound_at_once_and_fast_ones_raise_it_slowly() -> None:
    sizer = BatchSizer(cap=256, budget_s=0.015)
    sizer.observe(60e-6)
    assert sizer.observe(1e-3) == 15  # one slow batch: the next fits the budget
    limits = [sizer.observe(60e-6) for _ in range(40)]
    assert limits == sorted(limits)  # back up, never in a jump
    assert limits[0] < 20
    assert 150 < limits[-1] < 250  # 0.015 / (60 us + 0.9 ** 41 of the 940 us difference)


def test_the_floor_and_a_cap_below_it() -> None:
    assert BatchSizer(cap=256, budget_s=0.015).observe(1.0) == BatchSizer.FLOOR
    assert BatchSizer(cap=1, budget_s=0.015).observe(1.0) == 1  # one at a time stays so
    assert BatchSizer(cap=4, budget_s=0.015).observe(1e-6) == 4


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
