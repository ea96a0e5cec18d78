"""CPU per play of the worker's processor in-process, and of its session changelog's send
path: the two halves of the agent's per-play work that need no broker, to compare trees
alternating in one sitting (``PYTHONPATH`` at the other tree's checkout).

- ``stages``: ``Processor.process_batch`` (partitions=4, the live evaluator, deferred
  ranking, a dict table) over the second half of a synthetic stream (``SessionTraffic``)
  in batches of 64, ``rank_pending`` after each (not counted): the stage means
  (wall-clock, as the worker's histograms) and the batch's CPU per play.
- ``changelog``: ``BatchedChangelogTable.send_dirty`` of 64 dirty listeners at a time on a
  real Faust app (the seam's transport, no broker: the producer's ``send`` records), CPU
  per record; and ``table.get`` per read of a listener's state.

    python -m load_tests.processor_cost [--plays 24000] [--only stages|changelog]
    cd /other/tree && PYTHONPATH=$PWD python /this/tree/load_tests/processor_cost.py
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from load_tests.traffic import SessionTraffic


def stages(plays: int) -> str:
    from stream.config import load_settings
    from stream.core.evaluation import Prequential
    from stream.core.events import encode_event, key_partition
    from stream.core.recommender import Recommender
    from stream.processing.pipeline import Processor, Record

    now = int(time.time() * 1000)
    records = [Record("plays", key_partition(ev.user_id.encode(), 4), i, ev.user_id.encode(),
                      encode_event(ev), now)
               for i, ev in enumerate(SessionTraffic().events(plays))]
    settings = load_settings(env={}, file=None)
    rec = Recommender(blend=settings.ranker, session_models=settings.ranker == "learned")
    rec.emit_item_steps(False)  # as a worker without worker_keys (the P1 worker)
    proc = Processor(settings, rec, {}, lambda w: None, lambda d: None, defer_ranking=True,
                     partitions=4, evaluator=Prequential(k=10, window=settings.quality_window))
    half = (len(records) // 2) // 64 * 64
    totals: dict[str, float] = {}
    cpu = 0.0
    for start in range(0, len(records), 64):
        timed = start >= half
        t = time.process_time()
        proc.process_batch(records[start : start + 64], totals if timed else {})
        if timed:
            cpu += time.process_time() - t
        proc.rank_pending()
    n = len(records) - half
    means = " ".join(f"{k} {v / n * 1e6:.1f}" for k, v in totals.items())
    return f"stages us/play: {means} | process_batch CPU {cpu / n * 1e6:.1f} us/play"


def changelog(listeners: int = 64, rounds: int = 300) -> str:
    import faust

    from stream.core.session import UserState, update_session
    from stream.faustx import transport
    from stream.faustx.app import SeamApp
    from stream.faustx.changelog_table import BatchedChangelogTable
    from stream.worker.topics import USER_STATE_CODEC

    class Recorder:
        async def send(self, *args: Any) -> asyncio.Future[Any]:
            return asyncio.get_running_loop().create_future()

    transport.register()
    app = SeamApp("changelog-cost", broker="faustx://127.0.0.1:1", autodiscover=False,
                  Table=BatchedChangelogTable)
    app.producer.send = Recorder().send  # type: ignore[method-assign]
    table: Any = app.Table("sessions", default=None, partitions=4, schema=faust.Schema(
        key_serializer="json", value_serializer=USER_STATE_CODEC))
    table.key_serializer, table.value_serializer = "json", USER_STATE_CODEC  # as the worker
    table.partition_for_key = lambda key: 1
    states: dict[str, UserState] = {}
    for ev in SessionTraffic().events(4000):
        states[ev.user_id] = update_session(states.get(ev.user_id), ev).state
        states[ev.user_id].model = "A" * 92  # a listener record's length (16 factors)
    keys = list(states)[:listeners]

    async def run() -> str:
        sent = 0
        t = 0.0
        for r in range(rounds + 20):  # the first 20 rounds warm up
            for k in keys:
                table.on_key_set(k, states[k])
            t0 = time.process_time()
            got = await table.send_dirty()
            if r >= 20:
                t += time.process_time() - t0
                sent += got
            table._in_flight.clear()
        t0 = time.process_time()
        for _ in range(rounds):
            for k in keys:
                table.get(k)
        get = (time.process_time() - t0) / (rounds * len(keys)) * 1e6
        return f"changelog: send_dirty {t / sent * 1e6:.2f} us/record, get {get:.2f} us/read"

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plays", type=int, default=24_000)
    parser.add_argument("--only", choices=("stages", "changelog"))
    args = parser.parse_args()
    if args.only in (None, "stages"):
        print(stages(args.plays), flush=True)
    if args.only in (None, "changelog"):
        print(changelog(), flush=True)


if __name__ == "__main__":
    main()
