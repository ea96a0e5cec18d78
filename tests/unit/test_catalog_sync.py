"""The catalogue's play counts go to Redis in slices, with the event loop's other work in
between (a flood of new track ids made one flush pack thousands of tracks at once)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from stream.config import load_settings
from stream.core.catalog import TrackCatalog
from stream.worker.catalog_sync import COUNTS_SLICE, CatalogSync


class _Writer:
    def __init__(self, log: list[Any]) -> None:
        self.client = object()
        self.log = log

    def submit_commands(self, commands: list[bytes]) -> None:
        self.log.append(("commands", commands))


def test_play_counts_are_written_in_slices_with_other_work_between() -> None:
    settings = load_settings(env={}, file=None)
    catalog = TrackCatalog(settings.catalog_max_tracks, settings.catalog_max_chars)
    n = 2 * COUNTS_SLICE + 7
    for i in range(n):
        catalog.observe(f"t{i}", None, None, None, ts_ms=1_700_000_000_000 + i)
    catalog.take_changes()  # (first sightings: written after each ranking pass)
    log: list[Any] = []
    sync = CatalogSync(settings, catalog, _Writer(log), telemetry=None)  # type: ignore[arg-type]

    async def other() -> None:
        while True:
            log.append(("other", None))
            await asyncio.sleep(0)

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(other())
        await asyncio.sleep(0)
        await sync.write_counts()
        task.cancel()

    asyncio.run(main())
    batches = [cmds for kind, cmds in log if kind == "commands"]
    assert len(batches) == 3  # ceil(n / COUNTS_SLICE)
    hincr = [c for cmds in batches for c in cmds if c.startswith(b"*4\r\n$7\r\nHINCRBY")]
    assert len(hincr) == n  # every track's count, once
    first = log.index(("commands", batches[0]))
    last = log.index(("commands", batches[-1]))
    assert ("other", None) in log[first:last]  # the loop ran other work in between
    assert catalog.take_counts() == {}


def test_counts_not_yet_written_when_a_stop_cancels_the_flush_are_kept_for_the_final_write(
) -> None:
    """Review of session 13: cancelled between two slices, the rest of the taken counts
    were dropped (507 of 1,007 tracks' plays in the reproduction), and the final write at
    the stop had nothing left to send."""
    settings = load_settings(env={}, file=None)
    catalog = TrackCatalog(settings.catalog_max_tracks, settings.catalog_max_chars)
    n = 2 * COUNTS_SLICE + 7
    for i in range(n):
        catalog.observe(f"t{i}", None, None, None, ts_ms=1_700_000_000_000 + i)
    catalog.take_changes()
    log: list[Any] = []
    sync = CatalogSync(settings, catalog, _Writer(log), telemetry=None)  # type: ignore[arg-type]

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(sync.write_counts())
        await asyncio.sleep(0)  # the first slice is submitted, the flush yields
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        catalog.observe("t0", None, None, None, ts_ms=1_800_000_000_000)  # played meanwhile

    asyncio.run(main())
    written = [c for kind, cmds in log if kind == "commands" for c in cmds
               if c.startswith(b"*4\r\n$7\r\nHINCRBY")]
    left = catalog.take_counts()
    assert len(written) == COUNTS_SLICE  # t0 .. t{SLICE-1}: the first slice
    rest = {f"t{i}" for i in range(COUNTS_SLICE, n)}
    assert set(left) == rest | {"t0"}  # the unwritten tracks kept, and t0's new play
    assert all(left[t][0] == 1 for t in rest)
    assert left["t0"] == (1, 1_800_000_000_000)
