"""The Kafka side of item-state replication (docs/scaling.md): where the signal reader
starts, and which worker writes the item-state checkpoint. The rules themselves are pure
(:mod:`stream.core.signal_positions`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from stream.core.signal_positions import SignalPositions

logger = logging.getLogger("stream.signals")


async def seek_signals(consumer: Any, tps: Sequence[Any], positions: SignalPositions) -> None:
    """Start reading each signals partition where ``positions`` says: a restored
    checkpoint's offsets (its partitions unknown to it from their beginning), else the end.
    A recorded offset the topic no longer holds (retention deleted it) is a gap: logged,
    and read from the earliest offset kept. The start becomes the position a checkpoint
    taken before the first record records."""
    if positions.restored is None:
        await consumer.seek_to_end(*tps)
    else:
        earliest = await consumer.beginning_offsets(list(tps))
        for tp in tps:
            start = positions.start_offset(tp.partition) or 0
            first = int(earliest.get(tp, 0))
            if start < first:
                logger.warning(
                    "signals %s[%d]: the checkpoint's offset %d is no longer in the topic "
                    "(earliest %d): the item models miss the signals in between (raise "
                    "the signals topic's retention above checkpoint_interval_s)",
                    tp.topic, tp.partition, start, first)
                start = first
            consumer.seek(tp, start)
        logger.info("signals: replaying from the checkpoint's offsets %s",
                    {tp.partition: positions.start_offset(tp.partition) for tp in tps})
    for tp in tps:
        position = await consumer.position(tp)
        positions.handled(tp.partition, position - 1)


def is_checkpoint_writer(app: Any, plays_topic: str) -> bool:
    """Whether this worker writes the item-state checkpoint: the one that owns partition 0
    of the plays topic (one writer at a time; during a rebalance two may briefly both
    write, each a consistent item state with its own positions: the last one stays)."""
    try:
        assigned = app.consumer.assignment()
    except Exception:  # noqa: BLE001 - no consumer yet: not the writer now
        return False
    return any(tp.topic == plays_topic and tp.partition == 0 for tp in assigned)
