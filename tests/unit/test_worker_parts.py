"""The worker's parts that hold logic of their own, without Kafka or Redis: the ranker
(paced by the pipeline, waiting for the writer), the writer's readiness, the shutdown order,
the telemetry of a batch and the document formats."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from stream.adapters.metrics import Metrics
from stream.adapters.redis_store import RecoWriter, WriterDied
from stream.config import Settings
from stream.core.events import PlayEvent, parse_event
from stream.core.session import update_session
from stream.processing.documents import PendingWrite, encode_similar
from stream.processing.pacing import RankPacing
from stream.processing.pipeline import Outcome
from stream.worker.lifecycle import Lifecycle, Parts
from stream.worker.ranker import RANK_BUDGET_S, Ranker
from stream.worker.telemetry import Telemetry
from stream.worker.writer import WriterPart


class FakeProcessor:
    def __init__(self, per_pass: int = 1000) -> None:
        self.pending_rank: dict[str, Any] = {}
        self.ranked: list[list[str]] = []
        #: how many listeners a budgeted pass ranks
        self.per_pass = per_pass
        self.budgets: list[float | None] = []

    def rank_waiting(self) -> bool:
        return bool(self.pending_rank)

    def rank_pending(self, on_ranked: Any = None, budget_s: float | None = None) -> int:
        self.budgets.append(budget_s)
        n = len(self.pending_rank) if budget_s is None else self.per_pass
        users = list(self.pending_rank)[:n]
        for user in users:
            del self.pending_rank[user]
        self.ranked.append(users)
        return len(users)


class GateWriter:
    """A writer whose flush round trip is in flight until ``done`` is set."""

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.done.set()

    async def ready(self) -> None:
        await self.done.wait()


def make_ranker(hold_s: float = 0.0, per_pass: int = 1000) -> tuple[
        Ranker, FakeProcessor, GateWriter, RankPacing, list[str]]:
    processor, writer, pacing = FakeProcessor(per_pass), GateWriter(), RankPacing(hold_s)
    handed_on: list[str] = []
    telemetry = Telemetry(Metrics(CollectorRegistry()), Settings())
    ranker = Ranker(processor, pacing, writer, telemetry,  # type: ignore[arg-type]
                    models_busy=lambda: False, after_ranking=[lambda: handed_on.append("x")])
    return ranker, processor, writer, pacing, handed_on


def test_the_ranker_waits_for_the_writer_then_ranks_everyone_pending_in_one_pass() -> None:
    async def scenario() -> None:
        ranker, processor, writer, _, handed_on = make_ranker()
        task = asyncio.get_running_loop().create_task(ranker.run())
        writer.done.clear()  # a flush is in flight
        processor.pending_rank["a"] = 1
        ranker.wake()
        await asyncio.sleep(0.01)
        processor.pending_rank["b"] = 1
        ranker.wake()
        await asyncio.sleep(0.01)
        assert processor.ranked == []  # nothing ranked while the round trip is in flight
        writer.done.set()
        await asyncio.sleep(0.01)
        assert processor.ranked == [["a", "b"]] and handed_on == ["x"]
        task.cancel()

    asyncio.run(scenario())


def test_the_ranker_ranks_a_budgeted_chunk_per_pass_and_wakes_itself_for_the_rest() -> None:
    async def scenario() -> None:
        ranker, processor, _, _, handed_on = make_ranker(per_pass=2)
        task = asyncio.get_running_loop().create_task(ranker.run())
        processor.pending_rank.update(dict.fromkeys("abcde", 1))
        ranker.wake()  # one wake-up: the ranker re-wakes itself while listeners wait
        await asyncio.sleep(0.05)
        assert processor.ranked == [["a", "b"], ["c", "d"], ["e"]]
        assert processor.budgets == [RANK_BUDGET_S] * 3 and len(handed_on) == 3
        task.cancel()

    asyncio.run(scenario())


def test_the_ranker_holds_rankings_while_a_backlog_drains_then_ranks_them() -> None:
    async def scenario() -> None:
        ranker, processor, _, pacing, _ = make_ranker(hold_s=0.05)
        task = asyncio.get_running_loop().create_task(ranker.run())
        pacing.batch_applied(time.perf_counter(), nothing_pending=True, backlog=True)
        processor.pending_rank["a"] = 1
        ranker.wake()
        await asyncio.sleep(0.01)
        assert processor.ranked == []  # held: coalesced over hold_s
        await asyncio.sleep(0.1)  # no further batch: the ranker wakes itself
        assert processor.ranked == [["a"]]
        task.cancel()

    asyncio.run(scenario())


class SlowWriter(RecoWriter):
    """A RecoWriter whose round trip waits for ``release``."""

    def __init__(self) -> None:
        super().__init__(None, ttl_s=60, channel="c")  # type: ignore[arg-type]
        self.release = asyncio.Event()

    async def _send(self, batch: list[PendingWrite], deletes: list[str],
                    plain: dict[str, bytes] | None = None,
                    commands: Sequence[bytes] = ()) -> list[Any]:
        await self.release.wait()
        return [1] * (len(deletes) + len(plain or {}) + len(commands) + len(batch))


def test_the_writer_is_not_ready_while_a_flush_is_in_flight() -> None:
    async def scenario() -> None:
        writer = SlowWriter()
        writer.start()
        await asyncio.wait_for(writer.ready(), 1)  # idle: ready
        writer.submit(PendingWrite("reco:a", 1, b"{}", b"{}", 0, None, 0.0, "app"))
        await asyncio.sleep(0.01)
        waiting = asyncio.get_running_loop().create_task(writer.ready())
        await asyncio.sleep(0.01)
        assert not waiting.done()
        writer.release.set()
        await asyncio.wait_for(waiting, 1)
        await writer.stop()

    asyncio.run(scenario())


class BrokenWriter(RecoWriter):
    """A RecoWriter whose round trip fails with an error the flusher does not handle (not
    a Redis or connection error: a bug, a bad reply, a failing callback)."""

    def __init__(self) -> None:
        super().__init__(None, ttl_s=60, channel="c", flush_interval_ms=0)  # type: ignore[arg-type]

    async def _send(self, batch: list[PendingWrite], deletes: list[str],
                    plain: dict[str, bytes] | None = None,
                    commands: Sequence[bytes] = ()) -> list[Any]:
        raise KeyError("a bug in the flush")


def test_a_writer_whose_flusher_dies_says_so_and_a_stopped_one_does_not() -> None:
    async def scenario() -> None:
        writer = BrokenWriter()
        writer.start()
        writer.submit(PendingWrite("reco:a", 1, b"{}", b"{}", 0, None, 0.0, "app"))
        with pytest.raises(WriterDied, match="ended unexpectedly with 1 document"):
            await asyncio.wait_for(writer.watch(), 2)
        calm = SlowWriter()
        calm.start()
        watch = asyncio.get_running_loop().create_task(calm.watch())
        await asyncio.sleep(0.01)
        assert not watch.done()
        await calm.stop()
        await asyncio.wait_for(watch, 1)  # stopped: the watch just returns

    asyncio.run(scenario())


def test_a_part_task_that_dies_crashes_the_worker() -> None:
    """The lifecycle supervises the writer's flusher and the parts' loops: before, the
    flusher was a bare task, and one that died left a worker that kept consuming and
    committing plays whose lists were never written (a zombie)."""

    class Idle:
        async def run(self) -> None:
            await asyncio.sleep(3600)

        async def start(self) -> None: ...

    async def scenario() -> None:
        telemetry = Telemetry(Metrics(CollectorRegistry()), Settings())
        part = WriterPart(Settings(), telemetry)
        part.writer = BrokenWriter()

        async def start() -> None:
            assert part.writer is not None
            part.writer.start()

        part.start = start  # type: ignore[method-assign]
        parts = Parts(writer=part, ranker=Idle(), loop_lag=Idle(),  # type: ignore[arg-type]
                      signal_reader=Idle(), signals=None, checkpointer=None,  # type: ignore[arg-type]
                      catalog=None, models=None, lag=None)  # type: ignore[arg-type]
        lifecycle = Lifecycle(parts)
        await lifecycle.on_start()
        part.submit(PendingWrite("reco:a", 1, b"{}", b"{}", 0, None, 0.0, "app"))
        for _ in range(200):
            if lifecycle.crash_reason is not None:
                break
            await asyncio.sleep(0.01)
        assert isinstance(lifecycle.crash_reason, WriterDied)
        for fut in list(lifecycle._futures):
            fut.cancel()

    asyncio.run(scenario())


def test_the_shutdown_order_is_the_documented_one() -> None:
    calls: list[str] = []

    class Done:
        def __await__(self) -> Any:
            yield from ()

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getattr__(self, attr: str) -> Any:
            def call(*args: Any, **kwargs: Any) -> Done:
                flags = "".join(f"({k})" for k, v in kwargs.items() if v)
                calls.append(f"{self.name}.{attr}{flags}")
                return Done()

            return call

    parts = Parts(**{name: Recorder(name) for name in Parts.__dataclass_fields__})  # type: ignore[arg-type]

    async def scenario() -> None:
        await Lifecycle(parts).on_stop()

    asyncio.run(scenario())
    assert calls == [
        "checkpointer.write_final", "catalog.write(counts)", "models.free", "ranker.rank_due",
        "writer.stop", "signals.flush(force)", "writer.close", "signal_reader.stop",
        "lag.close",
    ]


def test_telemetry_observes_a_batch() -> None:
    registry = CollectorRegistry()
    settings = Settings()
    telemetry = Telemetry(Metrics(registry), settings)
    now_ms = 1_790_000_000_000
    event = parse_event(orjson.dumps({"user_id": "u", "track_id": "t", "ts": now_ms,
                                      "ms_played": 60_000, "context": "radio"}), now_ms=now_ms)
    assert isinstance(event, PlayEvent)
    update = update_session(None, event, gap_ms=1_800_000, max_recent=10, max_seen=10)
    outcomes = [Outcome("processed", event=event, update=update), Outcome("rejected")]
    telemetry.observe_batch(outcomes, {"decode": 0.002, "learn": 0.004}, 0.005)
    get = registry.get_sample_value
    topic = settings.plays_topic
    assert get("stream_events_total", {"topic": topic, "outcome": "processed"}) == 1
    assert get("stream_events_total", {"topic": topic, "outcome": "rejected"}) == 1
    assert get("stream_stage_seconds_count", {"stage": "learn"}) == 2
    assert get("stream_stage_seconds_sum", {"stage": "learn"}) == 0.004
    assert get("stream_processing_seconds_count") == 2
    assert get("stream_last_event_timestamp_seconds") == now_ms / 1000.0
    assert get("stream_plays_total", {"context": "radio"}) == 1
    # the gauge ends at the batch's last play (out of order here), as when set per play
    older = parse_event(orjson.dumps({"user_id": "u", "track_id": "t", "ts": now_ms - 5_000,
                                      "ms_played": 60_000}), now_ms=now_ms)
    assert isinstance(older, PlayEvent)
    telemetry.observe_batch([Outcome("processed", event=event, update=update),
                             Outcome("duplicate", event=older), Outcome("rejected")], {}, 0.001)
    assert get("stream_last_event_timestamp_seconds") == (now_ms - 5_000) / 1000.0
    assert get("stream_events_total", {"topic": topic, "outcome": "duplicate"}) == 1


def test_the_similar_list_format() -> None:
    doc = orjson.loads(encode_similar("t1", [{"track_id": "t2", "score": 0.5}],
                                      model_version="m", generated_at_ms=7))
    assert doc == {"track_id": "t1", "k": 1, "model_version": "m", "generated_at": 7,
                   "items": [{"track_id": "t2", "score": 0.5}]}


@pytest.mark.parametrize(("insecure", "steps"), [(False, False), (True, True)])
def test_the_worker_builds_item_steps_only_when_it_sends_signals(
    insecure: bool, steps: bool
) -> None:
    """The item step of a play is its signal's content: a worker that cannot send signals
    (no worker_keys, not worker_insecure) does not build it (Recommender.emit_item_steps)."""
    from stream.worker.app import create_worker

    worker = create_worker(Settings(worker_insecure=insecure), Metrics(CollectorRegistry()), 4)
    assert worker.recommender.item_steps is steps
