"""The track catalogue's Redis side: the pipeline's :class:`stream.core.catalog.TrackCatalog`
learns names from plays; this part writes them (and the coalesced play counts) to the
``track:{track_id}`` hashes, and reads back the names of tracks it has not seen named
(tracks played on other workers' partitions, names loaded with ``stream catalog load``,
names seen before a restart), so later documents carry them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from stream.adapters.redis_store import catalog_commands, read_track_names
from stream.config import Settings
from stream.core.catalog import TrackCatalog, TrackInfo
from stream.worker.telemetry import Telemetry
from stream.worker.writer import WriterPart

logger = logging.getLogger(__name__)

#: tracks whose play counts are packed in one turn of the event loop (about 1-3 ms)
COUNTS_SLICE: Final = 500


class CatalogSync:
    """Keeps the Redis catalogue and the in-memory one in step (see the module docstring)."""

    def __init__(
        self, settings: Settings, catalog: TrackCatalog, writer: WriterPart, telemetry: Telemetry
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.writer = writer
        self.telemetry = telemetry

    def write(self, counts: bool) -> None:
        """Queue the catalogue's writes on the Redis writer: first sightings and changed
        names (after every ranking pass), and the coalesced play counts when ``counts``
        (every catalog_flush_s, and at a stop)."""
        if self.writer.client is None:
            return
        changes = self.catalog.take_changes()
        plays = self.catalog.take_counts() if counts else {}
        if changes or plays:
            s = self.settings
            self.writer.submit_commands(
                catalog_commands(s.catalog_prefix, changes, plays, s.catalog_ttl_s)
            )

    def write_changes(self) -> None:
        """Queue the first sightings and changed names (after every ranking pass)."""
        self.write(counts=False)

    async def write_counts(self) -> None:
        """Every catalog_flush_s: each track's plays since the last time (one HINCRBY and
        last_seen per track, not a write per play), packed COUNTS_SLICE tracks per loop
        turn: under a flood of new track ids one flush held thousands of tracks (~20 ms of
        packing at 400 new tracks a second on a loaded machine, growing with the rate)."""
        self.write_changes()
        if self.writer.client is None:
            return
        plays = self.catalog.take_counts()
        s = self.settings
        items = list(plays.items())
        for lo in range(0, len(items), COUNTS_SLICE):
            self.writer.submit_commands(catalog_commands(
                s.catalog_prefix, {}, dict(items[lo : lo + COUNTS_SLICE]), s.catalog_ttl_s))
            if lo + COUNTS_SLICE < len(items):
                try:
                    await asyncio.sleep(0)
                except asyncio.CancelledError:
                    # a stop between two slices: the rest goes back, for the final write
                    self.catalog.give_back_counts(dict(items[lo + COUNTS_SLICE :]))
                    raise

    async def resolve_names(self) -> None:
        """Once a second, read back the names of up to 256 tracks a document wanted."""
        wanted = self.catalog.take_wanted(256)
        client = self.writer.client
        if not wanted or client is None:
            return
        try:
            found = await read_track_names(client, self.settings.catalog_prefix, wanted)
        except Exception as exc:  # noqa: BLE001 - names are cosmetic: try again later
            self.telemetry.redis_error("catalog")
            logger.warning("could not read track names from Redis: %s", exc)
            return
        for track in wanted:
            name, artist, album = found.get(track, (None, None, None))
            self.catalog.learn(track, TrackInfo(name, artist, album))
