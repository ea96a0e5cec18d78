"""Forgetting a listener drops what is still queued for them (pure logic, no services):
the ranking waiting for the next flush, the last published list the evaluator would score
their next play against, and a Redis write not yet flushed."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import orjson

from stream.adapters.redis_store import PendingWrite, RecoWriter
from stream.config import load_settings
from stream.core.events import PlayEvent, encode_event
from stream.core.recommender import Recommender
from stream.processing.pipeline import Processor, Record

NOW_S = 1_700_000_100.0


class RecordingEvaluator:
    """Stands in for stream.core.evaluation.Prequential: records what each play is scored
    against (test-then-train)."""

    def __init__(self) -> None:
        self.observed: list[tuple[str, tuple[str, ...], str]] = []

    def observe(self, variant: str, recommended: Sequence[str], actual: str) -> None:
        self.observed.append((variant, tuple(recommended), actual))

    def observe_skip(self, probability: float, skipped: bool) -> None:
        pass


def make(evaluator: RecordingEvaluator | None = None) -> tuple[Processor, list[PendingWrite]]:
    writes: list[PendingWrite] = []
    table: dict[str, Any] = {}
    p = Processor(
        load_settings(env={}, file=None),
        Recommender(),
        table,
        writes.append,
        lambda d: None,
        evaluator=evaluator,  # type: ignore[arg-type]
        clock=lambda: NOW_S,
        defer_ranking=True,
    )
    return p, writes


def play(user: str, track: str, i: int, offset: int) -> Record:
    value = encode_event(PlayEvent(user, track, 1_700_000_000_000 + i, 200_000, f"{user}-{i}"))
    return Record("plays", 0, offset, user.encode(), value, 1_700_000_000_000)


def users_written(writes: list[PendingWrite]) -> list[str]:
    return [orjson.loads(w.doc)["user_id"] for w in writes]


def test_forget_drops_the_listeners_pending_ranking() -> None:
    """A listener forgotten between their play and the next flush gets no document: the
    ranking queued for them is dropped (the worker's writer would otherwise re-create the
    document the forget just deleted)."""
    p, writes = make()
    p.process(play("victim", "a", 0, 0))
    p.process(play("other", "b", 1, 1))
    assert set(p.pending_rank) == {"victim", "other"}
    assert p.forget_user("victim") is True
    assert p.rank_pending() == 1
    assert users_written(writes) == ["other"]


def test_forget_drops_the_listeners_last_published_list() -> None:
    """After a forget, the listener's next play is a brand-new listener's first play: it is
    not scored against the list published before the forget."""
    evaluator = RecordingEvaluator()
    p, writes = make(evaluator)
    for i, track in enumerate(["a", "b", "c", "d"]):
        p.process(play("other", track, i, i))
    p.rank_pending()
    p.process(play("victim", "a", 10, 10))
    p.rank_pending()
    assert users_written(writes)[-1] == "victim"  # the victim has a published list now
    p.process(play("victim", "b", 11, 11))
    assert evaluator.observed[-1][2] == "b"  # scored against the list published before
    scored = len(evaluator.observed)
    p.rank_pending()

    assert p.forget_user("victim") is True
    p.process(play("victim", "c", 12, 12))
    assert len(evaluator.observed) == scored, (
        "the forgotten listener's new play was scored against their old list"
    )


def write_for(key: str, seq: int) -> PendingWrite:
    return PendingWrite(key, seq, b"{}", b"{}", 1_700_000_000_000, None, 0.0, "app")


def test_writer_forget_drops_the_pending_write_and_queues_the_delete() -> None:
    async def scenario() -> RecoWriter:
        # never started: nothing is flushed, what would be sent next is all there is
        writer = RecoWriter(None, ttl_s=60, channel="")  # type: ignore[arg-type]
        writer.submit(write_for("reco:victim", 3))
        writer.submit(write_for("reco:other", 5))
        writer.forget("reco:victim")
        return writer

    writer = asyncio.run(scenario())
    assert set(writer.pending) == {"reco:other"}
    assert writer.deletes == {"reco:victim"}
