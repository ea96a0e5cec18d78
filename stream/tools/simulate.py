"""``stream replay --workers N``: a deterministic offline simulator of N workers.

Listeners are split as Kafka splits them: the producer keys each play by its listener, the
default partitioner (murmur2, as aiokafka's and the Java client's) picks one of
``partitions`` partitions, and partition ``p`` belongs to worker ``p % N`` (a round-robin
assignment; with fewer partitions than workers the rest own nothing, as in a consumer
group). Each worker is an independent :class:`~stream.core.recommender.Recommender`
with its own session table. After learning a play, its owner queues the play's signal
(:func:`stream.processing.replication.signal_from`); ``signal_delay_ms`` of event time
later the other workers receive it, encoded, validated and applied by the same functions
the live worker uses (``encode_batch``, ``decode_batch``, ``apply_signals`` of
:mod:`stream.processing.replication`). Everything is in event time, so a run is exactly
repeatable; with ``workers=1`` it gives the numbers of a plain replay.

Evaluation is the replay's: every play is ranked by its owner, before learning it.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from aiokafka.partitioner import murmur2
from tqdm import tqdm

from stream.core.events import PlayEvent
from stream.core.recommender import VARIANTS, Recommender
from stream.core.session import UserState
from stream.processing.replication import (
    MAX_SIGNALS_PER_MESSAGE,
    TrackSignal,
    apply_signals,
    decode_batch,
    encode_batch,
    signal_from,
)
from stream.tools.replay import TestThenTrain


def partition_of(user_id: str, partitions: int) -> int:
    """The partition the producer's default partitioner gives this listener's plays."""
    return int((murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions)


class SimulatedWorkers:
    """N recommenders exchanging signals with a fixed event-time delay (see module)."""

    def __init__(self, recommenders: Sequence[Recommender], *, partitions: int,
                 signal_delay_ms: int) -> None:
        if not recommenders:
            raise ValueError("workers must be >= 1")
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions!r}")
        if signal_delay_ms < 0:
            raise ValueError(f"signal_delay_ms must be >= 0, got {signal_delay_ms!r}")
        self.recommenders = list(recommenders)
        self.partitions = partitions
        self.signal_delay_ms = signal_delay_ms
        #: (deliver at, sender, signal), deliver-at non-decreasing (events come in order)
        self.queue: deque[tuple[int, int, TrackSignal]] = deque()
        self.sent = 0
        self.applied = 0
        self.rejected = 0
        self.errors = 0
        self.messages = 0
        self.bytes = 0
        self.apply_seconds = 0.0
        self._owner: dict[str, int] = {}

    def owner(self, user_id: str) -> int:
        w = self._owner.get(user_id)
        if w is None:
            w = self._owner[user_id] = (partition_of(user_id, self.partitions)
                                        % len(self.recommenders))
        return w

    def send(self, worker: int, sig: TrackSignal) -> None:
        if len(self.recommenders) > 1:
            self.queue.append((sig.ts_ms + self.signal_delay_ms, worker, sig))
            self.sent += 1

    def deliver(self, now_ms: int) -> None:
        """Deliver every signal due by ``now_ms``: one message per sender per chunk of
        MAX_SIGNALS_PER_MESSAGE, encoded, validated and applied to every other worker."""
        queue = self.queue
        if not queue or queue[0][0] > now_ms:
            return
        by_sender: dict[int, list[TrackSignal]] = {}
        while queue and queue[0][0] <= now_ms:
            _, sender, sig = queue.popleft()
            by_sender.setdefault(sender, []).append(sig)
        for sender, sigs in by_sender.items():
            for i in range(0, len(sigs), MAX_SIGNALS_PER_MESSAGE):
                raw = encode_batch(f"w{sender}", sigs[i : i + MAX_SIGNALS_PER_MESSAGE])
                self.messages += 1
                self.bytes += len(raw)
                decoded = decode_batch(raw, now_ms=now_ms)
                self.rejected += len(decoded.rejected)
                started = time.perf_counter()
                for w, rec in enumerate(self.recommenders):
                    if w != sender:
                        counts = apply_signals(rec, decoded.signals)
                        self.applied += counts.applied
                        self.errors += counts.errors
                self.apply_seconds += time.perf_counter() - started

    def report(self) -> dict[str, Any]:
        return {
            "sent": self.sent, "applied": self.applied, "rejected": self.rejected,
            "errors": self.errors, "messages": self.messages,
            "bytes_per_signal": round(self.bytes / self.sent, 1) if self.sent else None,
            "apply_us_per_signal": (round(1e6 * self.apply_seconds / self.applied, 2)
                                    if self.applied else None),
        }


def replay_workers(
    events: Sequence[PlayEvent],
    *,
    workers: int,
    signal_delay_ms: int,
    partitions: int,
    k: int = 10,
    variants: Sequence[str] = VARIANTS,
    exclude_seen: bool = False,
    seed: int = 0,
    max_recent: int = 30,
    progress: bool = False,
    repeats: int = 0,
) -> tuple[dict[str, Any], dict[str, bytearray]]:
    """Prequential replay of ``events`` (in time order) through ``workers`` simulated
    workers -> (the replay's report plus ``workers`` and ``signals``, hits per variant)."""
    step = TestThenTrain(variants, k=k, exclude_seen=exclude_seen, max_recent=max_recent)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    recs = [Recommender(seed=seed, repeats=repeats) for _ in range(workers)]
    sim = SimulatedWorkers(recs, partitions=partitions, signal_delay_ms=signal_delay_ms)
    # one session table per worker (a listener only ever plays at their owner)
    tables: list[dict[str, UserState]] = [{} for _ in range(workers)]
    per_worker = [0] * workers
    started = time.perf_counter()
    bar = tqdm(events, disable=not progress, file=sys.stderr, unit="ev", mininterval=0.5,
               desc=f"{workers} worker(s)")
    for event in bar:
        sim.deliver(event.ts_ms)
        w = sim.owner(event.user_id)
        played = step.play(recs[w], tables[w], event)
        if played is None:
            continue
        update, learned = played
        sim.send(w, signal_from(f"w{w}", update, event, learned))
        per_worker[w] += 1
    seconds = time.perf_counter() - started
    report = step.report(recs[0], seed=seed, repeats=repeats,
                         users=sum(len(t) for t in tables), seconds=seconds)
    report.update({
        "workers": workers,
        "partitions": partitions,
        "signal_delay_ms": signal_delay_ms,
        "events_per_worker": per_worker,
        "signals": sim.report(),
    })
    return report, step.hits
