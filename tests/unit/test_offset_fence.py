"""The plays agent applies plays in offset order from where each partition was sought to
(stream.processing.fence): the crash-loop loss of session 10 (docs/reliability.md) was a
restarted worker whose stream started 1,900 offsets past its start and that applied -- and
committed -- what came."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from stream.processing.fence import WAIT, OffsetFence
from stream.worker.plays import PlaysAgent


def test_the_fence_lets_an_in_order_stream_through() -> None:
    fence = OffsetFence()
    fence.reset({"p0": 5, "p1": None}, epoch=1)
    assert [fence.admit("p0", o) for o in range(5, 9)] == [None] * 4
    assert fence.admit("p1", 40) is None  # start unknown: the first record sets it
    assert fence.admit("p1", 41) is None
    assert fence.admit("p0", 6) is None  # delivered again after a seek back: fine


def test_a_hole_is_read_again_and_a_real_gap_passes_the_second_time() -> None:
    fence = OffsetFence()
    fence.reset({"p0": 336}, epoch=1)
    assert fence.admit("p0", 2213) == 336
    assert fence.admit("p0", 2214, fresh=False) == WAIT  # the rest of the batch waits
    assert fence.admit("p0", 336) is None  # read again: the missing records come
    assert fence.admit("p0", 337) is None
    assert fence.admit("p0", 400) == 338  # a hole again
    assert fence.admit("p0", 400) is None  # read again, same record first: nothing between
    assert fence.admit("p0", 401) is None
    assert fence.absent == 62  # 338..399 were not in the log


def test_a_new_seek_resets_the_fence() -> None:
    fence = OffsetFence()
    fence.reset({"p0": 10}, epoch=1)
    assert fence.admit("p0", 10) is None
    fence.reset({"p0": 3}, epoch=2)
    assert fence.epoch == 2
    assert fence.admit("p0", 3) is None and fence.admit("p0", 5) == 4


@dataclass
class Msg:
    tp: str
    offset: int
    generation_id: int = 5
    topic: str = "plays"
    key: bytes = b"u"
    value: bytes = b"{}"
    timestamp: float = 0.0

    @property
    def partition(self) -> int:
        return int(self.tp[1:])


@dataclass
class Ev:
    message: Msg


@dataclass
class Consumer:
    """What the agent uses of the seam's consumer (SeamConsumer: tested in test_faust_seam)."""

    start_offsets: dict[str, int | None]
    seek_epoch: int = 1
    seeks: list[tuple[str, int]] = field(default_factory=list)
    first: dict[str, object] = field(default_factory=dict)

    async def read_again(self, tp: str, offset: int) -> None:
        self.seeks.append((tp, offset))
        self.first.pop(tp, None)

    def first_after_reread(self, tp: str) -> object:
        return self.first.get(tp)


@dataclass
class App:
    consumer: Consumer
    consumer_generation_id: int = 5


class Stream:
    def __init__(self) -> None:
        self.acked: list[int] = []
        self.dropped: list[int] = []

    def ack_processed(self, ev: Ev) -> bool:
        self.acked.append(ev.message.offset)
        return True

    def drop_unapplied(self, ev: Ev) -> None:
        self.dropped.append(ev.message.offset)


class Telemetry:
    """Counts what the agent reports about stale plays (stream_stale_generation_dropped_total)."""

    def __init__(self) -> None:
        self.stale = 0

    def stale_dropped(self, plays: int) -> None:
        self.stale += plays


def _agent(consumer: Consumer) -> PlaysAgent:
    agent = PlaysAgent.__new__(PlaysAgent)
    agent.app = App(consumer)  # type: ignore[assignment]
    agent.fence = OffsetFence()
    agent.sought = {}
    agent.skips_detected = 0
    agent.telemetry = Telemetry()  # type: ignore[assignment]
    return agent


def test_the_agent_does_not_apply_or_ack_plays_after_a_hole_and_reads_again() -> None:
    """The stream of a rejoined worker with no committed offset started at 2213 while the
    partition starts at 336: before the fence those plays were applied and acked, Faust
    committed 2358, and 336..2212 were never applied."""
    consumer = Consumer(start_offsets={"p0": 336, "p1": 100})
    agent, stream = _agent(consumer), Stream()
    events = [Ev(Msg("p0", 2213)), Ev(Msg("p1", 100)), Ev(Msg("p0", 2214)), Ev(Msg("p1", 101))]
    live, records, reread = agent._live(stream, events)  # type: ignore[arg-type]
    assert [(r.partition, r.offset) for r in records] == [(1, 100), (1, 101)]
    assert [e.message.offset for e in live] == [100, 101]
    assert stream.dropped == [2213, 2214] and stream.acked == []
    assert reread == {"p0": 336}
    asyncio.run(agent._read_again(reread))
    assert consumer.seeks == [("p0", 336)] and agent.skips_detected == 1
    # read again from 336 (the consumer marks the first record it fetched after the seek)
    consumer.first["p0"] = first = Msg("p0", 336)
    live, records, reread = agent._live(stream, [Ev(first), Ev(Msg("p0", 337))])  # type: ignore[arg-type]
    assert [r.offset for r in records] == [336, 337] and reread == {}


def test_stale_generations_are_still_dropped_before_the_fence() -> None:
    agent, stream = _agent(Consumer(start_offsets={"p0": 0})), Stream()
    live, records, reread = agent._live(stream, [Ev(Msg("p0", 7, generation_id=4))])  # type: ignore[arg-type]
    assert records == [] and stream.acked == [7] and reread == {}
    assert agent.fence.admit("p0", 0) is None  # the stale one did not move the fence
    assert agent.telemetry.stale == 1  # type: ignore[attr-defined]


def test_a_consumer_without_start_offsets_is_not_fenced() -> None:
    class Plain:
        pass

    agent, stream = _agent(Plain()), Stream()  # type: ignore[arg-type]
    live, records, reread = agent._live(stream, [Ev(Msg("p0", 50))])  # type: ignore[arg-type]
    assert [r.offset for r in records] == [50] and reread == {}


def test_records_on_their_way_before_a_reread_wait_and_the_first_read_again_passes() -> None:
    """The review's case (docs/reliability.md): after the seek back to 336 the stream still
    holds records buffered before it (2215, 2216, ...). They are neither applied nor acked
    and cause no further seek; the first record the consumer fetched after the seek passes
    even when it lies past 336 (nothing in between is in the log), and the order goes on
    from it. Before, the fence counted each such record as a new attempt and after three
    let one through out of order."""
    consumer = Consumer(start_offsets={"p0": 336})
    agent, stream = _agent(consumer), Stream()
    batch = [Ev(Msg("p0", o)) for o in (2213, 2214, 2215, 2216, 2217)]
    live, records, reread = agent._live(stream, batch)  # type: ignore[arg-type]
    assert records == [] and reread == {"p0": 336}
    assert stream.dropped == [2213, 2214, 2215, 2216, 2217] and stream.acked == []
    asyncio.run(agent._read_again(reread))
    assert consumer.seeks == [("p0", 336)]
    # more records buffered before the seek, then the first one fetched after it
    first = Msg("p0", 340)  # 336..339 are not in the log (say, retention moved the start)
    consumer.first["p0"] = first
    leftovers = [Ev(Msg("p0", o)) for o in (2218, 2219)]
    live, records, reread = agent._live(  # type: ignore[arg-type]
        stream, leftovers + [Ev(first), Ev(Msg("p0", 341)), Ev(Msg("p0", 342))])
    assert [r.offset for r in records] == [340, 341, 342] and reread == {}
    assert stream.dropped[-2:] == [2218, 2219] and consumer.seeks == [("p0", 336)]
    assert agent.fence.absent == 4
    # then a new hole is a new reread
    live, records, reread = agent._live(stream, [Ev(Msg("p0", 350))])  # type: ignore[arg-type]
    assert records == [] and reread == {"p0": 343}


def test_a_rebalance_ends_a_reread() -> None:
    fence = OffsetFence()
    fence.reset({"p0": 10}, epoch=1)
    assert fence.admit("p0", 12) == 10
    assert fence.admit("p0", 13, fresh=False) == WAIT
    fence.reset({"p0": 10}, epoch=2)  # a new seek to the committed offsets
    assert fence.admit("p0", 10) is None and fence.rereading == {}


def test_the_same_hole_read_again_is_let_through_at_once() -> None:
    fence = OffsetFence()
    fence.reset({"p0": 10}, epoch=1)
    assert fence.admit("p0", 12) == 10  # 10 and 11 missing: read again
    assert fence.admit("p0", 12) is None  # the same record first again: nothing in between
    assert fence.absent == 2


def test_a_reread_whose_seek_never_ran_is_asked_for_again() -> None:
    """Review of session 12 (L1): the batch that found the hole failed before its seek (say
    the dead-letter send raised) and Faust restarted the same agent. Every later record of
    the partition waits for a first record read again that can never come; the agent asks
    for the seek again instead of stalling the partition."""
    consumer = Consumer(start_offsets={"p0": 336})
    agent, stream = _agent(consumer), Stream()
    live, records, reread = agent._live(stream, [Ev(Msg("p0", 2213))])  # type: ignore[arg-type]
    assert reread == {"p0": 336}
    # ... no _read_again: the batch failed. The next batch:
    live, records, reread = agent._live(stream, [Ev(Msg("p0", 2214))])  # type: ignore[arg-type]
    assert records == [] and reread == {"p0": 336}
    asyncio.run(agent._read_again(reread))
    # once sought, records still buffered before the seek wait without another seek
    live, records, reread = agent._live(stream, [Ev(Msg("p0", 2215))])  # type: ignore[arg-type]
    assert records == [] and reread == {} and consumer.seeks == [("p0", 336)]
