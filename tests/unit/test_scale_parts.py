"""The worker parts that carry scale-out replication (docs/worker.md, "Item state across
workers and restarts"), without Kafka or Redis: the signal reader's positions and filter,
and the checkpointer's single writer and sealed positions."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from stream.adapters.metrics import Metrics
from stream.config import Settings
from stream.core.checkpoint import open_checks, open_models
from stream.core.models.blend import N_FEATURES
from stream.core.recommender import Recommender
from stream.core.signal_positions import Restored, SignalPositions
from stream.processing.replication import TrackSignal, encode_batch
from stream.worker.checkpointer import Checkpointer
from stream.worker.signals import SignalReader
from stream.worker.telemetry import Telemetry

NOW_MS = int(time.time() * 1000)


@dataclass
class Record:
    key: bytes
    value: bytes
    partition: int
    offset: int
    topic: str = "signals"
    headers: tuple[Any, ...] = ()


async def _free() -> None:
    return None


def make_reader(
    positions: SignalPositions,
) -> tuple[SignalReader, Recommender, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    settings = Settings(worker_insecure=True)
    rec = Recommender(seed=0)
    reader = SignalReader(settings, "signals", None, "me", rec, _free,  # type: ignore[arg-type]
                          Telemetry(metrics, settings), positions=positions)
    reader.ring = _Unsigned()  # type: ignore[assignment]
    return reader, rec, registry


class _Unsigned:
    """A key ring that finds every record unsigned (allowed: worker_insecure)."""

    def verify(self, *args: Any) -> str:
        return "unsigned"


def sig(sender: str, seq: int, track: str) -> TrackSignal:
    return TrackSignal(worker=sender, track_id=track, ts_ms=NOW_MS - 1000, skipped=False,
                       history=(), seq=seq)


def test_the_reader_skips_what_the_restored_checkpoint_holds_and_reads_past_each_record(
) -> None:
    positions = SignalPositions("me", Restored("old", 2, {0: 5}))
    reader, rec, registry = make_reader(positions)
    batch = encode_batch("old", [sig("old", 1, "held"), sig("old", 2, "held"),
                                 sig("old", 3, "new")],
                         seq=1, sent_ms=int(time.time() * 1000))  # ReplayGuard: both required
    r = Record(key=b"old", value=batch, partition=0, offset=5)
    asyncio.run(reader._apply(r, reader.admit(r)))
    assert rec.vocabulary.ids == ["new"]  # seq 1-2 were in the checkpoint already
    assert positions.skipped_restored == 2
    assert positions.offsets[0] == 6
    applied = registry.get_sample_value("stream_track_signals_total", {"direction": "applied"})
    assert applied == 1
    # the replication delay of that message: sent (signed send time) -> applied here
    assert registry.get_sample_value("stream_signal_delay_seconds_count") == 1
    delay = registry.get_sample_value("stream_signal_delay_seconds_sum")
    assert delay is not None and 0 <= delay < 60


def test_the_replication_delay_is_measured_from_the_signed_send_time() -> None:
    reader, rec, registry = make_reader(SignalPositions("me", None))
    sent = int(time.time() * 1000) - 1500  # sent 1.5 s ago
    batch = encode_batch("other", [sig("other", 1, "t1")], seq=1, sent_ms=sent)
    r = Record(key=b"other", value=batch, partition=0, offset=0)
    asyncio.run(reader._apply(r, reader.admit(r)))
    delay = registry.get_sample_value("stream_signal_delay_seconds_sum")
    assert delay is not None and 1.5 <= delay < 5


def test_the_checkpointer_writes_only_as_the_writer_and_seals_the_positions() -> None:
    settings = Settings(checkpoint_keys="k1:" + "s" * 32)
    rec = Recommender(seed=0)
    positions = SignalPositions("me", Restored("old", 4, {0: 7, 1: 3}))

    class Client:
        """Not a Redis client: a write through it fails (and is counted)."""

    registry = CollectorRegistry()
    writer = [False]
    cp = Checkpointer(settings, rec, lambda: Client(), _free,
                      Telemetry(Metrics(registry), settings),
                      positions=positions, is_writer=lambda: writer[0])

    def attempts() -> float:
        return sum(registry.get_sample_value("stream_checkpoints_total", {"result": r}) or 0.0
                   for r in ("written", "error"))

    asyncio.run(cp.write_final())
    assert attempts() == 0  # not the owner of plays partition 0: no write tried
    writer[0] = True
    asyncio.run(cp.write_final())
    assert attempts() == 1  # the writer tries (the fake client fails it: counted)
    blob = cp._blob()
    _, opened = open_models(blob, **open_checks(settings, int(time.time() * 1000)))
    assert opened.replication == Restored("me", rec.n_learned, {0: 7, 1: 3})


def test_the_reader_counts_blend_rows_it_leaves_out_and_applies_the_rest() -> None:
    reader, rec, registry = make_reader(SignalPositions("me", None))
    rec.use_ranker("learned")
    rows = np.ones((1, N_FEATURES), np.float32)
    kept = rec.ranker.weights
    batch = encode_batch("other", [
        TrackSignal("other", "t1", NOW_MS - 1000, False, (), blend_pairs=rows,
                    blend_loss="pairwise"),  # this blend learns with softmax
        TrackSignal("other", "t2", NOW_MS - 1000, False, (), blend_pairs=rows,
                    blend_loss="softmax")], seq=1, sent_ms=int(time.time() * 1000))
    r = Record(key=b"other", value=batch, partition=0, offset=0)
    asyncio.run(reader._apply(r, reader.admit(r)))
    assert rec.vocabulary.ids == ["t1", "t2"]
    assert registry.get_sample_value("stream_track_signals_total",
                                     {"direction": "applied"}) == 2
    assert registry.get_sample_value("stream_signals_rejected_total",
                                     {"reason": "blend_loss"}) == 1
    assert rec.ranker.n_pairs == 1 and rec.ranker.weights.tolist() != kept.tolist()
