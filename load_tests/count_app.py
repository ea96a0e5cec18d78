"""Baseline (b): a Faust agent that only counts events -- Faust's own per-event cost.

Same broker/consumer settings as the worker (stream/worker/app.py: at-least-once, commit every 1000
or 1 s, stream buffer 4096, raw bytes, ``stream.events()``), but memory store, no table and
its own app id. Configured by env: LT_APP_ID, LT_TOPIC, LT_PARTITIONS, LT_PROGRESS (a file it
appends ``<epoch s> <count>`` to every LT_EVERY events), LT_EXPECT (writes a final line when
reached), LT_FAST_DRAIN=1 (the worker's own Faust changes, the seam's transport: the direct
hand-over, stream/faustx/delivery.py, and since session 8 the consumer on the event loop,
stream/faustx/consumer.py; for the stricter comparison in docs/benchmarks.md). Run by
load_tests.throughput; by hand:

    LT_APP_ID=lt-count LT_TOPIC=plays LT_PROGRESS=/tmp/count.txt python -m load_tests.count_app
"""

from __future__ import annotations

import os
import time

import faust

from stream.config import load_settings
from stream.faustx import transport
from stream.faustx.app import SeamApp, broker_url
from stream.faustx.options import SeamOptions

settings = load_settings()
app_id = os.environ["LT_APP_ID"]
topic_name = os.environ["LT_TOPIC"]
partitions = int(os.environ.get("LT_PARTITIONS", "4"))
progress_path = os.environ["LT_PROGRESS"]
every = int(os.environ.get("LT_EVERY", "1000"))
expect = int(os.environ.get("LT_EXPECT", "0"))
seam = os.environ.get("LT_FAST_DRAIN") == "1"
if seam:
    transport.register()

# stock Faust (faust.App, its own kafka:// transport) unless LT_FAST_DRAIN: the seam's
# transport with the in-loop consumer and the direct hand-over only (Faust's fetch wait, no
# held topics)
extra = {"seam": SeamOptions(in_loop=True, fast_delivery=True)} if seam else {}
app = (SeamApp if seam else faust.App)(
    app_id,
    **extra,
    broker=broker_url(settings, scheme=transport.SCHEME if seam else "kafka"),
    store="memory://",
    topic_partitions=partitions,
    processing_guarantee="at_least_once",
    consumer_auto_offset_reset="earliest",
    web_enabled=False,
    autodiscover=False,
    broker_commit_every=1000,
    broker_commit_interval=1.0,
    stream_buffer_maxsize=4096,
)
plays = app.topic(
    topic_name,
    key_type=bytes,
    value_type=bytes,
    key_serializer="raw",
    value_serializer="raw",
    partitions=partitions,
)


@app.agent(plays, name="count-plays")
async def count_plays(stream: faust.StreamT[bytes]) -> None:
    count = 0
    with open(progress_path, "a", buffering=1) as out:
        out.write(f"{time.time():.6f} 0 start\n")
        async for _event in stream.events():
            count += 1
            if count == 1 or count % every == 0 or count == expect:
                out.write(f"{time.time():.6f} {count}\n")


if __name__ == "__main__":
    worker = faust.Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False)
    worker.spinner = None  # as stream.worker.app.run_worker: no DEBUG root logger for the spinner
    worker.execute_from_commandline()
