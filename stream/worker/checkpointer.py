"""The one owner of model checkpoints: restore at start-up, periodic writes, the final write.

- the format (data only, signed) is :mod:`stream.core.checkpoint`; the models' state is
  ``Recommender.export_state`` / ``import_state``;
- the bytes go to and come from Redis through :mod:`stream.adapters.redis_store`
  (``load_checkpoint`` / ``save_checkpoint``, key ``model:{app_id}``, the forget
  tombstones ``forgotten:{app_id}``);
- a periodic checkpoint is built in a forked child (:mod:`stream.worker.snapshot`: the event
  loop pays only for the fork); the final one, at a clean stop, in-process.

:func:`restore_models` runs before the worker starts (synchronously, before the event
loop); it also returns the signals positions the checkpoint includes
(:mod:`stream.core.signal_positions`: the signal reader replays from them). A checkpoint
that cannot be read or is refused (:data:`REJECT_REASONS`) is logged in one line, counted
in ``stream_checkpoints_rejected_total{reason}``, and the worker learns from scratch -- it
never stops over a checkpoint. Listeners forgotten since (the tombstones) are dropped from
the restored models. ``stream checkpoint`` verifies the stored one with
:func:`read_checkpoint`, as the worker would.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from stream.adapters.metrics import Metrics
from stream.adapters.redis_store import (
    CheckpointTooLarge,
    checkpoint_key,
    load_checkpoint,
    load_tombstones,
    save_checkpoint,
    tombstone_member,
    tombstones_key,
)
from stream.config import Settings, redis_auth
from stream.core.checkpoint import (
    REJECT_REASONS,
    CheckpointRejected,
    Opened,
    checkpoint_mode,
    open_checks,
    open_models,
    seal_models,
    settings_keys,
)
from stream.core.recommender import Recommender
from stream.core.signal_positions import Restored, SignalPositions
from stream.processing.control import forgotten_in_checkpoint
from stream.worker.snapshot import build_in_child, can_fork
from stream.worker.telemetry import Telemetry

logger = logging.getLogger("stream.worker")

__all__ = ["REJECT_REASONS", "Checkpointer", "StoredCheckpoint", "read_checkpoint",
           "restore_models"]

#: a checkpoint's snapshot child is killed (and the checkpoint counted as an error) after this
CHECKPOINT_CHILD_TIMEOUT_S: Final = 120.0


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    """The checkpoint in Redis, opened and checked."""

    key: str
    blob: bytes
    recommender: Recommender
    opened: Opened


def read_checkpoint(settings: Settings, now_ms: int) -> StoredCheckpoint | None:
    """The stored checkpoint, checked as the worker restores it; None if there is none.
    Raises :class:`CheckpointRejected` (with a ``reason``) for every other failure."""
    from redis.exceptions import ResponseError

    key = checkpoint_key(settings.app_id)
    try:
        blob = load_checkpoint(settings.redis_url, key, max_bytes=settings.checkpoint_max_bytes,
                               **redis_auth(settings))
    except CheckpointTooLarge as exc:
        raise CheckpointRejected("oversized", str(exc)) from None
    except ResponseError as exc:  # e.g. WRONGTYPE: the key holds something else
        raise CheckpointRejected("malformed", f"Redis refused to read it: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - Redis down at start: learn from scratch
        raise CheckpointRejected(
            "unreadable", f"could not read it: {type(exc).__name__}: {exc}") from None
    if blob is None:
        return None
    try:
        rec, opened = open_models(blob, **open_checks(settings, now_ms))
    except CheckpointRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - never let a checkpoint stop the worker
        raise CheckpointRejected("malformed", f"{type(exc).__name__}: {exc}") from None
    return StoredCheckpoint(key, blob, rec, opened)


def _checkpoints_allowed(settings: Settings, key: str) -> bool:
    """Whether this configuration restores (and writes) checkpoints; logs why not, or why
    they are unsigned."""
    mode = checkpoint_mode(settings)
    if mode == "off":
        logger.info("model checkpoints are off (checkpoint_interval_s = 0)")
        return False
    if mode == "refused":
        logger.error(
            "model checkpoints DISABLED: no checkpoint key is set, so this worker will "
            "neither restore nor write %s (anyone who can write Redis could forge one). Set "
            "STREAM_CHECKPOINT_KEYS=kid:secret, or STREAM_CHECKPOINT_INSECURE=true to accept "
            "unsigned checkpoints anyway", key)
        return False
    if mode == "insecure":
        logger.warning(
            "model checkpoints are UNSIGNED (checkpoint_insecure=true): anyone who can write "
            "Redis key %s can replace this worker's models; set STREAM_CHECKPOINT_KEYS", key)
    return True


def _drop_forgotten(settings: Settings, rec: Recommender, created_ms: int,
                    now_ms: int) -> tuple[int, int]:
    """Drop the listeners forgotten within forget_tombstone_ttl_s from the restored models
    (those forgotten after the checkpoint was written, less forget_grace_s:
    stream.processing.control.forgotten_in_checkpoint); returns (tombstones, listeners
    dropped). Raises if the tombstones cannot be read."""
    forgotten = load_tombstones(settings.redis_url, tombstones_key(settings.app_id), now_ms,
                                settings.forget_tombstone_ttl_s, **redis_auth(settings))
    dropped = sum(rec.forget_user(user) for user in forgotten_in_checkpoint(
        rec.user_ids(), forgotten, created_ms, tombstone_member,
        grace_ms=int(settings.forget_grace_s * 1000)))
    return len(forgotten), dropped


def restore_models(
    settings: Settings, metrics: Metrics
) -> tuple[Recommender | None, Restored | None]:
    """The recommender from the last checkpoint in Redis, or None to start fresh (see the
    module docstring), and the signals positions that checkpoint includes (None: read the
    signals topic from its end); sets ``stream_checkpoint_restored``."""
    telemetry = Telemetry(metrics, settings)
    stored = _restore(settings, telemetry)
    telemetry.checkpoint_restored(stored is not None)
    if stored is None:
        return None, None
    return stored.recommender, stored.opened.replication


def _restore(settings: Settings, telemetry: Telemetry) -> StoredCheckpoint | None:
    key = checkpoint_key(settings.app_id)
    if not _checkpoints_allowed(settings, key):
        return None

    def reject(reason: str, why: str) -> None:
        telemetry.checkpoint_rejected(reason)
        logger.error("rejected model checkpoint %s (%s): %s; starting fresh", key, reason, why)

    now_ms = int(time.time() * 1000)
    try:
        stored = read_checkpoint(settings, now_ms)
    except CheckpointRejected as exc:
        reject(exc.reason, str(exc))
        return None
    if stored is None:
        logger.info("no model checkpoint at %s; starting fresh", key)
        return None
    try:
        tombstones, dropped = _drop_forgotten(settings, stored.recommender,
                                             stored.opened.created_ms, now_ms)
    except Exception as exc:  # noqa: BLE001 - without them a forgotten listener could return
        reject("unreadable", f"could not read the forget tombstones: {type(exc).__name__}: {exc}")
        return None
    logger.info(
        "restored models from checkpoint %s (%d bytes, key id %s, written %.0f s ago); "
        "%d forget tombstone(s), %d listener(s) dropped", key, len(stored.blob),
        stored.opened.kid, (now_ms - stored.opened.created_ms) / 1000, tombstones, dropped)
    return stored


class Checkpointer:
    """Writes the models to Redis every ``checkpoint_interval_s`` (:meth:`write_periodic`,
    in a forked child) and once more at a clean stop (:meth:`write_final`, in-process). One
    at a time: a periodic one skips while another runs, the final one waits for it (so the
    newer snapshot is the one left in Redis). Failures are counted and retried next time.

    With several workers only one writes (``is_writer``: the owner of plays partition 0,
    :func:`stream.worker.replica_sync.is_checkpoint_writer`), and every checkpoint includes
    the signals ``positions`` of the instant its state was snapshot (docs/scaling.md)."""

    def __init__(
        self,
        settings: Settings,
        recommender: Any,
        redis_client: Callable[[], Any],
        models_free: Callable[[], Awaitable[None]],
        telemetry: Telemetry,
        positions: SignalPositions | None = None,
        is_writer: Callable[[], bool] = lambda: True,
    ) -> None:
        self.settings = settings
        self.recommender = recommender
        self.positions = positions
        self.is_writer = is_writer
        self.redis_client = redis_client
        self.models_free = models_free
        self.telemetry = telemetry
        self.enabled = checkpoint_mode(settings) in ("signed", "insecure")
        self.key = checkpoint_key(settings.app_id)
        self._keys = settings_keys(settings)
        self._lock = asyncio.Lock()

    async def write_periodic(self) -> None:
        if not self._lock.locked():
            await self._write(in_child=True)

    async def write_final(self) -> None:
        await self._write(in_child=False)

    def _blob(self) -> bytes:
        # in the snapshot child: the time is the instant the state was forked, and the
        # signals positions are those of that instant (item state: stream.core.checkpoint)
        positions = self.positions
        return seal_models(self.recommender, keys=self._keys, app_id=self.settings.app_id,
                           created_ms=int(time.time() * 1000),
                           replication=None if positions is None
                           else positions.checkpoint(self.recommender.n_learned))

    async def _write(self, in_child: bool) -> None:
        client = self.redis_client()
        if not self.enabled or client is None:
            return
        if not self.is_writer():
            return  # one writer: the owner of plays partition 0 (docs/scaling.md)
        async with self._lock:
            await self.models_free()  # never snapshot models an eviction is changing
            started = time.perf_counter()
            try:
                if in_child and can_fork():
                    blob, paused = await build_in_child(
                        self._blob, timeout_s=CHECKPOINT_CHILD_TIMEOUT_S)
                else:
                    blob = self._blob()
                    paused = time.perf_counter() - started
                self.telemetry.checkpoint_paused(paused)
                await save_checkpoint(client, self.key, blob)
            except Exception as exc:  # noqa: BLE001 - Redis down etc.: keep serving, retry
                self.telemetry.checkpoint_failed()
                logger.warning("model checkpoint failed: %s: %s", type(exc).__name__, exc)
                return
            self.telemetry.checkpoint_written(time.perf_counter() - started, len(blob))
