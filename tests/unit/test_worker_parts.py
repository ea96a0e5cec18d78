"""The worker's parts that hold logic of their own, without Kafka or Redis: the ranker
(paced by the pipeline, waiting for the writer), the writer's readiness, the shutdown order,
the telemetry of a batch and the document formats."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from stream.adapters.metrics import Metrics
from stream.adapters.redis_store import RecoWriter
from stream.config import Settings
from stream.core.events import PlayEvent, parse_event
from stream.core.session import update_session
from stream.processing.documents import PendingWrite, encode_similar
from stream.processing.pacing import RankPacing
from stream.processing.pipeline import Outcome
from stream.worker.lifecycle import Lifecycle, Parts
from stream.worker.ranker import Ranker
from stream.worker.telemetry import Telemetry


class FakeProcessor:
    def __init__(self) -> None:
        self.pending_rank: dict[str, Any] = {}
        self.ranked: list[list[str]] = []

    def rank_pending(self, on_ranked: Any = None) -> int:
        users, self.pending_rank = list(self.pending_rank), {}
        self.ranked.append(users)
        return len(users)


class GateWriter:
    """A writer whose flush round trip is in flight until ``done`` is set."""

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.done.set()

    async def ready(self) -> None:
        await self.done.wait()


def make_ranker(hold_s: float = 0.0) -> tuple[Ranker, FakeProcessor, GateWriter, RankPacing,
                                                  list[str]]:
    processor, writer, pacing = FakeProcessor(), GateWriter(), RankPacing(hold_s)
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


def test_the_similar_list_format() -> None:
    doc = orjson.loads(encode_similar("t1", [{"track_id": "t2", "score": 0.5}],
                                      model_version="m", generated_at_ms=7))
    assert doc == {"track_id": "t1", "k": 1, "model_version": "m", "generated_at": 7,
                   "items": [{"track_id": "t2", "score": 0.5}]}
