"""N workers learn as one (issue #17), against the real broker and Redis: a listener's MF
factors move with their partition, and two workers restarted (SIGKILL) neither lose nor
double-apply item-side learning (the item-state checkpoint records the signals offsets it
includes; a restored worker replays the signals topic from them)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import numpy as np
import orjson
import pytest

from stream.adapters.kafka import read_topic
from stream.adapters.redis_store import RecoReader, checkpoint_key
from stream.config import Settings
from stream.core.checkpoint import open_models, settings_keys
from stream.core.events import PlayEvent
from stream.core.listener_record import decode_listener_record

from .conftest import free_port, produce, wait_until
from .test_scale_out import owned_partitions, users_by_partition

pytestmark = pytest.mark.integration

T0 = 1_790_000_000_000
N_FACTORS = 32  # the worker's default


def split(a, b, settings: Settings, parts: set[int]):  # type: ignore[no-untyped-def]
    def check() -> tuple[set[int], set[int]] | None:
        pa = owned_partitions(a, settings.plays_topic)
        pb = owned_partitions(b, settings.plays_topic)
        ok = pa and pb and not pa & pb and pa | pb == parts
        return (pa, pb) if ok else None

    return wait_until(check, 120, what="both workers own disjoint partitions")


def session_factors(settings: Settings, user: str) -> np.ndarray | None:
    """The listener's MF factors as their session's last changelog record holds them."""
    topic = f"{settings.app_id}-sessions-changelog"
    records = asyncio.run(read_topic(settings, topic, max_messages=100_000, timeout_s=5.0))
    mine = [r for r in records if r.key == orjson.dumps(user) and r.value]  # JSON keys
    if not mine:
        return None
    last = max(mine, key=lambda r: r.offset)
    state = orjson.loads(last.value)
    factors, _ = decode_listener_record(state["model"], n_factors=N_FACTORS, max_own=255)
    return factors


def applied_seq(reader: RecoReader, expected: Counter[str]) -> bool:
    for user, n in expected.items():
        doc = reader.get(user)
        if doc is None or doc.seq != n:
            return False
    return True


def test_a_listener_moving_to_another_worker_keeps_their_factors(
    settings: Settings, worker_factory, reader: RecoReader
) -> None:
    a = worker_factory()
    b = worker_factory(settings.replace(metrics_port=free_port()))
    users = users_by_partition(settings.partitions, per_partition=3)
    warm = [PlayEvent(us[0], "warm", T0, 200_000, f"warm-{p}") for p, us in users.items()]
    produce(settings, warm)
    pa, _ = split(a, b, settings, set(users))
    mover = users[min(pa)][1]  # a listener of a partition A owns
    events = [PlayEvent(mover, f"t{k % 7}", T0 + 1000 + k, 200_000, f"m-{k}")
              for k in range(12)]
    produce(settings, events)
    expected = Counter(e.user_id for e in warm + events)
    wait_until(lambda: applied_seq(reader, expected), 90, what="the mover's plays applied")
    def held() -> list[np.ndarray] | None:  # (a list: an array has no truth value)
        f = session_factors(settings, mover)
        return [f] if f is not None else None

    (before,) = wait_until(held, 30, what="the mover's factors in their session's changelog")

    assert a.stop() == 0  # B takes over A's partitions (the mover's session moves)
    wait_until(lambda: owned_partitions(b, settings.plays_topic) == set(users), 120,
               what="B owns every partition")
    produce(settings, [PlayEvent(mover, "t3", T0 + 5000, 200_000, "m-after")])
    expected[mover] += 1
    wait_until(lambda: applied_seq(reader, expected), 90, what="the mover's play on B")

    def moved_on() -> list[np.ndarray] | None:
        f = session_factors(settings, mover)
        return [f] if f is not None and not np.array_equal(f, before) else None

    (after,) = wait_until(moved_on, 30, what="B's learning in the mover's session")
    cosine = float(after @ before / (np.linalg.norm(after) * np.linalg.norm(before)))
    # one SGD step from their factors; a fresh start would be a random vector (|cos| ~ 0.2)
    assert cosine > 0.9, cosine


def checkpoint_counts(settings: Settings, reader: RecoReader) -> dict[str, float] | None:
    """Plays per track in the item-state checkpoint (trending weights: every play here
    is a full play within seconds of T0, so each weighs 1.0)."""
    blob = reader.client.get(checkpoint_key(settings.app_id))
    if blob is None:
        return None
    rec, _ = open_models(blob, keys=settings_keys(settings), app_id=settings.app_id,
                         now_ms=int(time.time() * 1000))
    w = rec.popularity.weights()
    ids = rec.vocabulary.ids
    return {ids[r]: round(float(w[r]), 3) for r in range(len(ids)) if w[r] > 0}


def test_two_workers_restarted_neither_lose_nor_double_apply_item_learning(
    settings: Settings, worker_factory, reader: RecoReader
) -> None:
    fast = settings.replace(checkpoint_interval_s=1.0)
    a = worker_factory(fast)
    b = worker_factory(fast.replace(metrics_port=free_port()))
    users = users_by_partition(settings.partitions, per_partition=4)
    listeners = [u for us in users.values() for u in us]
    warm = [PlayEvent(us[0], "warm", T0, 200_000, f"warm-{p}") for p, us in users.items()]
    produce(settings, warm)
    split(a, b, settings, set(users))
    plays: list[PlayEvent] = list(warm)

    def phase(name: str, n: int) -> None:
        # every listener plays tracks both workers' listeners play: each track's count
        # gathers plays learned locally on one worker and through signals on the other
        batch = [PlayEvent(u, f"s-{(i + j) % 9}", T0 + 1000 + len(plays) + i * 50 + j,
                           200_000, f"{name}-{u}-{j}")
                 for j in range(n) for i, u in enumerate(listeners)]
        produce(settings, batch)
        plays.extend(batch)
        expected = Counter(e.user_id for e in plays)
        wait_until(lambda: applied_seq(reader, expected), 120, what=f"{name} applied")

    phase("one", 5)
    wait_until(lambda: checkpoint_counts(settings, reader) is not None, 60,
               what="an item-state checkpoint")
    phase("two", 4)
    time.sleep(1.0)  # signals go out every 50 ms: let phase two's reach the topic
    a.kill()
    b.kill()  # both die without a final checkpoint: Redis holds an older one

    a2 = worker_factory(fast.replace(metrics_port=free_port()))
    b2 = worker_factory(fast.replace(metrics_port=free_port()))
    for w in (a2, b2):
        assert w.metric_value("stream_checkpoint_restored") == 1
        assert "replaying from the checkpoint's offsets" in w.log_text()
    split(a2, b2, settings, set(users))
    phase("three", 3)

    want = {t: float(n) for t, n in Counter(e.track_id for e in plays).items()}
    wait_until(lambda: checkpoint_counts(settings, reader) == want, 90,
               what="a checkpoint with every play counted exactly once")
    time.sleep(3.0)  # later checkpoints (either worker may write) still count each once
    assert checkpoint_counts(settings, reader) == want
