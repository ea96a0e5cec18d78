"""A minimal app-side reader of stream-reco recommendations.

Subscribes to the ``reco-updates`` channel and, for every update, reads the listener's
list from Redis and renders it with track names ("Karma Police by Radiohead"), falling
back to the Redis track catalogue (``track:{track_id}``) and then to the id. Only the
``redis`` package is needed (no stream-reco import), as in a separate app.

    python examples/reader.py                          # every listener, until Ctrl-C
    python examples/reader.py --user 276 --once        # print one list and exit
    python examples/reader.py --redis-url redis://127.0.0.1:6379/0 --seconds 30

Documents are described in docs/reading-recommendations.md and
configs/schemas/recommendations.schema.json; ignore fields you do not know (new ones may
be added).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import redis


def track_label(item: dict[str, Any], catalogue: dict[str, dict[str, str]]) -> str:
    """Title by artist from the item, else from the catalogue, else the track id."""
    known = catalogue.get(item["track_id"], {})
    name = item.get("name") or known.get("name")
    artist = item.get("artist") or known.get("artist")
    if not name:
        return str(item["track_id"])
    return f"{name} by {artist}" if artist else str(name)


def render(doc: dict[str, Any], client: redis.Redis, catalog_prefix: str = "track:") -> str:
    """A listener's list as text. Items without names are looked up in the catalogue."""
    missing = [i["track_id"] for i in doc["items"] if not i.get("name")]
    catalogue: dict[str, dict[str, str]] = {}
    if missing:
        pipe = client.pipeline(transaction=False)
        for track in missing:
            pipe.hgetall(f"{catalog_prefix}{track}")
        for track, fields in zip(missing, pipe.execute(), strict=True):
            catalogue[track] = {k.decode(): v.decode() for k, v in fields.items()}
    lines = [f"{doc['user_id']} (list #{doc['seq']}):"]
    for n, item in enumerate(doc["items"], 1):
        # `reason` is ready-made English; `reason_code` + `reason_track_id` let an app
        # write (or translate) its own, e.g. {"played": "Weil du {track} gehört hast"}
        lines.append(f"{n:>3}. {track_label(item, catalogue)}  ({item['reason']})")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--prefix", default="reco:", help="list key prefix (STREAM_REDIS_PREFIX)")
    p.add_argument("--channel", default="reco-updates", help="STREAM_NOTIFY_CHANNEL")
    p.add_argument("--catalog-prefix", default="track:", help="STREAM_CATALOG_PREFIX")
    p.add_argument("--user", help="only this listener")
    p.add_argument("--once", action="store_true", help="print the current list and exit")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long")
    args = p.parse_args()
    client = redis.Redis.from_url(args.redis_url, socket_timeout=5)
    if args.once:
        raw = client.get(f"{args.prefix}{args.user}") if args.user else None
        if raw is None:
            print(f"no list for {args.user!r}")
            return 1
        print(render(json.loads(raw), client, args.catalog_prefix))
        return 0
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(args.channel)
    deadline = None if args.seconds is None else time.monotonic() + args.seconds
    seen: dict[str, int] = {}
    try:
        while deadline is None or time.monotonic() < deadline:
            msg = pubsub.get_message(timeout=1.0)
            if msg is None or msg.get("type") != "message":
                continue
            note = json.loads(msg["data"])  # {"user_id", "seq", "event_id", ...}
            user = note["user_id"]
            if args.user and user != args.user:
                continue
            if seen.get(user, -1) > note["seq"]:
                continue  # an older update arriving late
            raw = client.get(f"{args.prefix}{user}")
            if raw is None:  # expired or forgotten meanwhile
                continue
            doc = json.loads(raw)
            seen[user] = doc["seq"]
            print(render(doc, client, args.catalog_prefix), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        pubsub.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
