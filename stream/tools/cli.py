"""The ``stream`` command: stack, worker, produce, recs, similar, replay, demo, config."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from stream.config import Settings, load_settings, redis_auth
from stream.errors import ConfigError, StackError, StreamError


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        k: getattr(args, k)
        for k in ("kafka_bootstrap", "redis_url", "plays_topic", "app_id", "metrics_port")
        if getattr(args, k, None) is not None
    }
    return load_settings(**overrides)


# --------------------------------------------------------------------------- stack


def cmd_stack(args: argparse.Namespace) -> int:
    from stream.tools import stack, stack_cluster

    cfg = stack.StackConfig.from_env()
    cc = stack_cluster.ClusterConfig.from_env(cfg, brokers=args.brokers or 3)
    services = args.services or (
        ["kafka", "redis", "prometheus"]
        if args.action != "up" or not args.no_prometheus
        else ["kafka", "redis"]
    )
    if args.action == "down" and not args.services:
        services = services + list(stack.OPTIONAL_SERVICES)  # stopped first (reverse order)
    # --brokers N / --redis-cluster swap the single node for the cluster (its own ports)
    kafka_cluster = bool(args.brokers and args.brokers > 1)
    redis_cluster = bool(args.redis_cluster)
    singles = [
        s
        for s in services
        if not (s == "kafka" and kafka_cluster) and not (s == "redis" and redis_cluster)
    ]
    if args.action == "up":
        if kafka_cluster:
            stack_cluster.start_kafka_cluster(cc)
        if redis_cluster:
            stack_cluster.start_redis_cluster(cc)
        stack.up(cfg, singles)
        print(f"stack is up (state dir: {cfg.state_dir})")
        if kafka_cluster:
            print(f"  kafka_bootstrap={cc.bootstrap} replication_factor=3 min_insync_replicas=2")
        if redis_cluster:
            print(f"  redis_url={cc.redis_url}")
    elif args.action == "down":
        stack.down(cfg, singles)
        if kafka_cluster or (not args.services and not redis_cluster):
            stack_cluster.stop_kafka_cluster(cc)
        if redis_cluster or (not args.services and not kafka_cluster):
            stack_cluster.stop_redis_cluster(cc)
    else:
        st = {**stack.status(cfg), **stack_cluster.status(cc)}
        for name, info in st.items():
            state = "ready" if info["ready"] else ("running" if info["pid"] else "stopped")
            print(f"{name:<15} {state:<8} pid={info['pid'] or '-':<8} port={info['port']}")
        worker = stack.worker_pid(cfg)
        if worker is not None:  # the detached worker `stream demo` left running
            print(f"{'worker':<15} {'running':<8} pid={worker:<8} (stopped by `stream stack down`)")
        return 0 if all(i["ready"] for i in st.values()) else 3
    return 0


# --------------------------------------------------------------------------- worker


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings(args)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
    )
    # aiokafka's connection debug log prints SASL login bytes (user and password): never
    # let it log below INFO, whatever log_level says
    logging.getLogger("aiokafka.conn").setLevel(max(logging.INFO, logging.getLogger().level))
    log = logging.getLogger(__name__)
    # start-up phases, as the recovery drill reads them from the log (load_tests/recovery.py)
    log.info("worker process up (interpreter and settings loaded)")
    from stream.adapters.redis_store import check_redis_mode

    # a cluster client against a standalone server (or the reverse) is a setting's mistake
    check_redis_mode(settings.redis_url, **redis_auth(settings))
    from stream.faustx.tablestore import prepare_store

    data_lock = prepare_store(settings)  # rocksdb: this worker's data_dir, held until exit
    from stream.adapters.kafka import ensure_topics
    from stream.adapters.metrics import Metrics, serve
    from stream.core.recommender import warm_up
    from stream.worker.app import create_worker, run_worker
    from stream.worker.checkpointer import restore_models

    log.info("start-up imports done")
    # compile/load the numba kernels now, not on the first play (see warm_up)
    log.info("recommender kernels ready in %.1f s", warm_up())

    log.info("effective settings: %s", json.dumps(settings.masked()))
    partitions = asyncio.run(ensure_topics(settings))
    metrics = Metrics()
    try:
        serve(metrics, settings.metrics_host, settings.metrics_port)
    except OSError as exc:
        raise ConfigError(
            f"setting 'metrics_port' (env STREAM_METRICS_PORT): cannot listen on "
            f"{settings.metrics_host}:{settings.metrics_port}: {exc.strerror}"
        ) from exc
    print(
        f"worker {settings.app_id}: {settings.plays_topic} ({partitions} partitions) -> "
        f"Redis {settings.masked()['redis_url']}; metrics on "
        f"http://{settings.metrics_host}:{settings.metrics_port}/metrics",
        file=sys.stderr,
        flush=True,
    )
    # the checkpointer's, at start-up: the models and the signals positions they include
    recommender, restored = restore_models(settings, metrics)
    worker = create_worker(settings, metrics, partitions, recommender, restored=restored)
    skip_redeclaring(settings, worker.app)
    log.info("worker built")
    run_worker(worker)
    if data_lock is not None:
        data_lock.release()
    return 0


def skip_redeclaring(settings: Settings, app: Any) -> None:
    """A restart: Faust's internal topics exist, so Faust does not declare them again
    (~0.7 s each, stream.faustx.startup)."""
    from stream.adapters.kafka import existing_topics
    from stream.faustx.startup import declare_nothing, declared_topics

    names = declared_topics(app)
    # a loop of its own, never made current: the app may hold the current one already
    loop = asyncio.new_event_loop()
    try:
        present = loop.run_until_complete(existing_topics(settings, names))
    finally:
        loop.close()
    if set(names) <= present:
        declare_nothing(app)


# --------------------------------------------------------------------------- produce


def cmd_produce(args: argparse.Namespace) -> int:
    from stream.tools.producer import dataset_events, produce_events

    settings = _settings(args)
    events = dataset_events(args.source, args.path, args.count, args.time_mode)
    sent = asyncio.run(
        produce_events(
            settings,
            events,
            rate=args.rate,
            max_count=args.count,
            max_seconds=args.seconds,
            progress=not args.quiet,
        )
    )
    label = " (synthetic)" if args.source == "synthetic" else ""
    print(f"produced {sent} {args.source}{label} events to {settings.plays_topic}")
    return 0


# --------------------------------------------------------------------------- recs / similar


def _reader(settings: Settings):  # type: ignore[no-untyped-def]
    from stream.adapters.redis_store import RecoReader

    return RecoReader(
        settings.redis_url,
        **redis_auth(settings),
        prefix=settings.redis_prefix,
        similar_prefix=settings.similar_prefix,
        channel=settings.notify_channel,
        catalog_prefix=settings.catalog_prefix,
    )


def _show_item(i: int, item: dict[str, Any], catalogue: dict[str, dict[str, str]]) -> str:
    """One list line: title by artist (from the document, else the Redis catalogue), or the
    track id when no name is known; the reason as stored."""
    track = str(item["track_id"])
    known = catalogue.get(track, {})
    name = item.get("name") or known.get("name")
    artist = item.get("artist") or known.get("artist")
    label = track if not name else (f"{name} by {artist}" if artist else str(name))
    return f"{i:>3}. {label:<48} {float(item['score']):>7.4f}  {item.get('reason', '')}"


def _show_list(reader: Any, items: list[dict[str, Any]]) -> list[str]:
    missing = [str(it["track_id"]) for it in items if not it.get("name")]
    catalogue = reader.tracks(missing) if missing else {}
    return [_show_item(i, it, catalogue) for i, it in enumerate(items, 1)]


def cmd_recs(args: argparse.Namespace) -> int:
    settings = _settings(args)
    reader = _reader(settings)
    raw = reader.get_raw(args.user)
    if raw is None:
        print(f"no recommendations for {args.user!r} (key {settings.redis_prefix}{args.user})")
        return 1
    if args.json:  # exactly the stored document
        sys.stdout.write(raw.decode() + "\n")
        return 0
    doc = json.loads(raw)
    age = time.time() - doc["generated_at"] / 1000
    print(
        f"{doc['user_id']}: {len(doc['items'])} tracks, seq {doc['seq']}, model "
        f"{doc.get('model_version', '')}, generated {age:.1f}s ago from event {doc['event_id']}"
    )
    print("\n".join(_show_list(reader, doc["items"])))
    return 0


def cmd_similar(args: argparse.Namespace) -> int:
    settings = _settings(args)
    reader = _reader(settings)
    raw = reader.similar_raw(args.track)
    if raw is None:
        print(f"no 'more like this' list for {args.track!r} yet")
        return 1
    if args.json:  # exactly the stored document
        sys.stdout.write(raw.decode() + "\n")
        return 0
    doc = json.loads(raw)
    seed = reader.tracks([args.track]).get(args.track, {})
    title = seed.get("name")
    label = args.track if not title else (
        f"{title} by {seed['artist']}" if seed.get("artist") else title)
    print(f"more like {label}: {len(doc.get('items', []))} tracks")
    print("\n".join(_show_list(reader, doc.get("items", []))))
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    """``stream catalog load FILE``: upsert track names without a play."""
    from stream.tools.catalog_load import load_catalog_file

    settings = _settings(args)
    written = load_catalog_file(settings, args.file)
    print(f"upserted {written} tracks into {settings.catalog_prefix}* from {args.file}")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    """Send a deletion request for a listener to the control topic, signed with the first
    of ``worker_keys`` (the workers refuse unsigned ones unless worker_insecure)."""
    from stream.adapters.kafka import ensure_topics, make_producer
    from stream.processing.auth import KeyRing
    from stream.processing.control import forget_record

    settings = _settings(args)
    ring = KeyRing.parse(settings.worker_keys)
    if not ring and not settings.worker_insecure:
        raise ConfigError(
            "setting 'worker_keys' (env STREAM_WORKER_KEYS): required to sign a control "
            "command (the workers refuse unsigned ones unless worker_insecure=true)"
        )

    async def send() -> None:
        await ensure_topics(settings)
        producer = make_producer(settings)
        await producer.start()
        try:
            key, value, headers = forget_record(args.user, ring, settings.control_topic)
            await producer.send_and_wait(
                settings.control_topic, value, key=key, headers=headers
            )
        finally:
            await producer.stop()

    asyncio.run(send())
    print(
        f"deletion request for {args.user!r} sent to {settings.control_topic}; the owning "
        f"worker purges its session state, model parameters and {settings.redis_prefix}"
        f"{args.user}"
    )
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    """Verify the model checkpoint in Redis as the worker would, and describe it."""
    from stream.adapters.redis_store import checkpoint_key
    from stream.core.checkpoint import CheckpointRejected
    from stream.worker.checkpointer import read_checkpoint

    settings = _settings(args)
    key = checkpoint_key(settings.app_id)
    now_ms = int(time.time() * 1000)
    try:
        stored = read_checkpoint(settings, now_ms)
        if stored is None:
            raise CheckpointRejected("malformed", "no checkpoint stored")
    except CheckpointRejected as exc:
        out = {"key": key, "valid": False, "reason": exc.reason, "error": str(exc)}
        print(json.dumps(out) if args.json else f"{key}: REJECTED ({exc.reason}): {exc}")
        return 1
    blob, rec, opened = stored.blob, stored.recommender, stored.opened
    info = {
        "key": key, "valid": True, "bytes": len(blob), "kid": opened.kid,
        "app_id": opened.app_id, "created_ms": opened.created_ms,
        "age_s": round((now_ms - opened.created_ms) / 1000, 1),
        "tracks": rec.catalogue_size(), "listeners": len(rec.mf.user_factors),
        "plays_learned": rec.n_learned,
    }
    if args.user:
        info["user"] = args.user
        info["user_has_factors"] = args.user in rec.mf.user_factors
    if args.json:
        print(json.dumps(info))
    else:
        for name, value in info.items():
            print(f"{name:<17} {value}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(json.dumps(_settings(args).masked(), indent=2))
    return 0


# --------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from stream.tools.demo import run_demo

    return run_demo(
        _settings(args),
        source=args.source,
        count=args.count,
        rate=args.rate,
        keep_running=args.keep_running,
    )


# --------------------------------------------------------------------------- parser


def _common(sp: argparse.ArgumentParser) -> None:
    """The connection options every subcommand but ``stack`` takes."""
    sp.add_argument("--kafka-bootstrap", dest="kafka_bootstrap")
    sp.add_argument("--redis-url", dest="redis_url")
    sp.add_argument("--plays-topic", dest="plays_topic")
    sp.add_argument("--app-id", dest="app_id")


def _add_stack(sub: Any) -> None:
    s = sub.add_parser("stack", help="local Kafka (KRaft) + Redis + Prometheus without Docker")
    s.add_argument("action", choices=("up", "down", "status"))
    s.add_argument(
        "services",
        nargs="*",
        choices=("kafka", "redis", "prometheus", "kafka-secure", []),
        default=[],
        help="default: kafka redis prometheus; kafka-secure (SASL/SCRAM + ACLs, "
        "docs/reliability.md) starts only when named; a bare `down` stops it too",
    )
    s.add_argument("--no-prometheus", action="store_true", help="up: start only Kafka and Redis")
    s.add_argument(
        "--brokers",
        type=int,
        default=0,
        help="a Kafka KRaft cluster of this many combined broker+controller nodes "
        "(3: replication factor 3, min.insync.replicas 2) instead of the single broker",
    )
    s.add_argument(
        "--redis-cluster",
        action="store_true",
        help="a Redis Cluster (3 primaries + 3 replicas) instead of the single Redis",
    )
    s.set_defaults(func=cmd_stack)


def _add_produce(sub: Any) -> None:
    pr = sub.add_parser("produce", help="replay a dataset or synthetic traffic into Kafka")
    _common(pr)
    pr.add_argument(
        "--source", choices=("movielens", "lastfm", "spotify", "sessionrec", "csv", "synthetic"),
        default="lastfm",
    )
    pr.add_argument("--path", help="dataset file/folder (default: ../shared/datasets/...)")
    pr.add_argument("--count", type=int, default=None, help="stop after N events")
    pr.add_argument("--seconds", type=float, default=600.0, help="stop after N seconds")
    pr.add_argument("--rate", type=float, default=None, help="events/s (default: max)")
    pr.add_argument(
        "--time-mode",
        choices=("now", "original"),
        default="now",
        help="'now': stamp events with the time they are sent (default); "
        "'original': keep the dataset's timestamps",
    )
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=cmd_produce)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stream", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    _add_stack(sub)

    w = sub.add_parser("worker", help="run the Faust worker")
    _common(w)
    w.add_argument("--metrics-port", dest="metrics_port", type=int)
    w.set_defaults(func=cmd_worker)
    _add_produce(sub)


    r = sub.add_parser("recs", help="print a listener's recommendations from Redis")
    _common(r)
    r.add_argument("user")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_recs)

    si = sub.add_parser("similar", help="print the 'more like this' list of a track")
    _common(si)
    si.add_argument("track")
    si.add_argument("--json", action="store_true")
    si.set_defaults(func=cmd_similar)

    cl = sub.add_parser("catalog", help="track metadata: upsert names without a play")
    _common(cl)
    cl.add_argument("action", choices=("load",))
    cl.add_argument(
        "file", help="CSV (header track_id,name,artist,album) or JSONL (one object per line)"
    )
    cl.set_defaults(func=cmd_catalog)

    fg = sub.add_parser("forget", help="purge a listener's state and recommendations")
    _common(fg)
    fg.add_argument("user")
    fg.set_defaults(func=cmd_forget)

    ck = sub.add_parser("checkpoint", help="verify and describe the model checkpoint in Redis")
    _common(ck)
    ck.add_argument("--user", help="also say whether this listener's factors are in it")
    ck.add_argument("--json", action="store_true")
    ck.set_defaults(func=cmd_checkpoint)

    c = sub.add_parser("config", help="print the effective settings (secrets masked)")
    _common(c)
    c.set_defaults(func=cmd_config)

    d = sub.add_parser("demo", help="stack + worker + producer replaying real plays")
    _common(d)
    d.add_argument("--source", choices=("lastfm", "movielens", "spotify"), default="movielens",
                   help="real plays to replay (default: MovieLens-100K ratings as plays)")
    d.add_argument("--count", type=int, default=20_000)
    d.add_argument("--rate", type=float, default=500.0)
    d.add_argument(
        "--keep-running",
        action="store_true",
        help=argparse.SUPPRESS,  # the worker always stays up now (`stream stack down`)
    )
    d.set_defaults(func=cmd_demo)

    for name in ("replay", "top"):
        try:
            module = __import__(f"stream.tools.{name}", fromlist=["register"])
        except ImportError:
            continue
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except StackError as exc:
        print(f"stack error: {exc}", file=sys.stderr)
        return 2
    except StreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
