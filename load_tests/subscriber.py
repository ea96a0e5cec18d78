"""Records every recommendation-update notification with its arrival time (epoch seconds).

A separate process, so the arrival timestamps are not delayed by the producer sharing a GIL
or an event loop. Prints ``ready`` once subscribed; stops at --seconds, --max or SIGTERM and
writes ``<arrival epoch s>\\t<notification json>`` lines to --out.

    python -m load_tests.subscriber --channel reco-updates --seconds 30 --out /tmp/notes.tsv
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import redis


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m load_tests.subscriber")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--channel", required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--max", type=int, default=5_000_000)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    client = redis.Redis.from_url(args.redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(args.channel)
    pubsub.get_message(timeout=2.0)  # consumes the subscribe confirmation (nothing sent yet)
    print("ready", flush=True)
    got: list[tuple[float, bytes]] = []
    deadline = time.monotonic() + args.seconds
    while not stop[0] and len(got) < args.max and time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=0.2)
        if msg is not None and msg["type"] == "message":
            got.append((time.time(), msg["data"]))
    with open(args.out, "wb") as out:
        for t, data in got:
            out.write(f"{t:.6f}\t".encode() + data + b"\n")
    pubsub.close()
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
