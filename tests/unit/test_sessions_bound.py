"""The session-table bound part (``max_sessions``): the plays agent's after-batch step,
with the pipeline's real eviction order and fakes of the Faust table, app and writer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry

from stream.adapters.metrics import Metrics
from stream.config import Settings
from stream.worker import sessions_bound
from stream.worker.sessions_bound import SessionBound
from stream.worker.telemetry import Telemetry


class FakeTable(dict[str, Any]):
    def __init__(self, users: dict[str, int]) -> None:
        super().__init__({u: {"last_partition": p} for u, p in users.items()})
        self.deleted: list[tuple[str, int, bool]] = []

    def keys_chunks(self, size: int) -> Iterator[list[str]]:
        keys = list(self)
        for lo in range(0, len(keys), size):
            yield keys[lo : lo + size]

    def approx_len(self) -> int:
        return len(self)

    def delete_on(self, user: str, partition: int, *, changelog: bool = True) -> bool:
        self.deleted.append((user, partition, changelog))
        return self.pop(user, None) is not None


class FakeApp:
    consumer_generation_id = 1

    def assigned_partitions(self, topic: str) -> set[int]:
        assert topic == "plays"
        return {0}


class FakeProcessor:
    """The pipeline's eviction order (Processor.track_sessions / sessions_over /
    evict_sessions) over the fake table."""

    def __init__(self, table: FakeTable, max_sessions: int) -> None:
        self.table = table
        self.max_sessions = max_sessions
        self.order: list[str] = []

    def track_sessions(self, users: list[str]) -> int:
        new = [u for u in users if u not in self.order]
        for user in new:  # each as the least recent, as the pipeline does
            self.order.insert(0, user)
        return len(new)

    def sessions_over(self) -> int:
        return max(0, len(self.order) - self.max_sessions)

    def evict_sessions(self, limit: int, delete: Any, owned: Any) -> list[str]:
        out = []
        while limit and len(self.order) > self.max_sessions:
            user = self.order.pop(0)
            limit -= 1
            partition = self.table[user]["last_partition"]
            delete(user, partition, owned(partition))
            if owned(partition):
                out.append(user)
        return out

    def redis_key(self, user: str) -> str:
        return f"reco:{user}"


class FakeWriter:
    def __init__(self) -> None:
        self.forgotten: list[str] = []

    def forget(self, key: str) -> None:
        self.forgotten.append(key)


def test_restored_listeners_are_seeded_in_chunks_then_evicted_above_the_cap(
        monkeypatch: Any) -> None:
    monkeypatch.setattr(sessions_bound, "SESSION_SEED_CHUNK", 2)
    monkeypatch.setattr(sessions_bound, "SESSION_EVICT_BATCH", 2)
    table = FakeTable({"a": 0, "b": 1, "c": 0, "d": 0})
    processor, writer = FakeProcessor(table, max_sessions=1), FakeWriter()
    metrics = Metrics(CollectorRegistry())
    bound = SessionBound(FakeApp(), Settings(), processor, table, writer,  # type: ignore[arg-type]
                         Telemetry(metrics, Settings()))
    # first batch: a, b seeded (b the least recent) and b evicted down to the cap; b is on
    # a partition this worker does not own: it leaves memory only (no changelog tombstone,
    # no Redis delete)
    assert bound.after_batch() == 0
    assert table.deleted == [("b", 1, False)] and writer.forgotten == []
    # next batch: the rest seeded (c, d, as the least recent), then evicted down to the cap
    assert bound.after_batch() == 2
    assert table.deleted[1:] == [("d", 0, True), ("c", 0, True)] and list(table) == ["a"]
    assert writer.forgotten == ["reco:d", "reco:c"]
    assert bound.after_batch() == 0  # seeded for this generation, at the cap
    assert metrics.sessions_evicted._value.get() == 2
