"""P3 memory: bytes per active listener's state at 100k listeners, and the item-side model
memory against dense float32 factor matrices. In-process, no Kafka: the real
:class:`stream.processing.pipeline.Processor` with a dict as the session table and the real
:class:`stream.core.recommender.Recommender`, fed synthetic sessions until ``--users`` listeners
have state.

Per listener it reports
- the serialised table value (Faust's ``json`` codec, what the changelog carries) + key;
- the Python heap a memory-store table holds per listener *after a changelog restore*
  (tracemalloc around decoding every serialised value into a fresh dict; track ids resolve
  to the catalogue's shared strings, as in a worker that restored its models first);
- an exact deep ``sys.getsizeof`` walk of the live table values, and of a ``UserState``
  (in case the table ever keeps objects instead of dicts), leaving out the catalogue's
  track-id strings the rings point at (counted once, on the item side).

Item side: the recommender's own ``memory_footprint()``-style method if it has one, else an
exact deep walk of every model attribute (and stream.core.sizing's sampled estimate, what the
worker exports), compared with ``n_items x n_factors x 4`` bytes (dense float32).

Ranking keeps no state, so by default it is skipped to feed 100k listeners in a minute or
two (``--rank`` keeps it, much slower).

    python -m load_tests.memory --users 100000
    python -m load_tests.memory --users 10000 --rank     # quick, with ranking
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import math
import sys
import time
import tracemalloc
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from faust.serializers import codecs
from tqdm import tqdm

from load_tests.common import Report, percentiles, run_id, table
from load_tests.traffic import SessionTraffic, make_events, source_label
from stream.config import load_settings
from stream.core.events import PlayEvent, encode_event
from stream.core.recommender import Recommender
from stream.core.sizing import model_memory_bytes
from stream.processing.pipeline import Processor, Record

FOOTPRINT_METHODS = ("memory_footprint", "footprint_bytes", "memory_bytes", "footprint", "nbytes")


def deep_size(
    obj: Any, seen: set[int] | None = None, shared: frozenset[int] | set[int] = frozenset()
) -> int:
    """Exact deep size (every reachable container/attribute, each object once), leaving
    out the objects in ``shared`` (ids of objects another structure owns and counts)."""
    seen = set() if seen is None else seen
    stack = [obj]
    total = 0
    while stack:
        o = stack.pop()
        if id(o) in seen or id(o) in shared:
            continue
        seen.add(id(o))
        if isinstance(o, np.ndarray):
            total += sys.getsizeof(o)  # includes the buffer when the array owns it
            continue
        total += sys.getsizeof(o)
        if isinstance(o, (str, bytes, int, float, bool, type(None), type)):
            continue
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)) or hasattr(o, "maxlen") and hasattr(o, "__iter__"):
            stack.extend(o)
        else:
            d = getattr(o, "__dict__", None)
            if d is not None:
                stack.append(d)
            for klass in type(o).__mro__:
                for slot in klass.__dict__.get("__slots__", ()):
                    if slot not in ("__dict__", "__weakref__") and hasattr(o, slot):
                        stack.append(getattr(o, slot))
    return total


def table_codec() -> Any:
    """The worker's changelog value codec (stream.worker.topics.USER_STATE_CODEC), else Faust json."""
    try:
        from stream.worker.topics import USER_STATE_CODEC

        return codecs.get_codec(USER_STATE_CODEC)
    except ImportError:
        return codecs.get_codec("json")


def feed(
    users: int,
    max_events: int,
    max_seconds: float,
    rank: bool,
    source: str,
    seed: int,
    session_plays: float = 3.0,
) -> tuple[dict[str, Any], Recommender, Processor, dict[str, Any]]:
    settings = load_settings()
    recommender = Recommender()
    real_recommend = recommender.recommend
    if not rank:
        # Ranking keeps no state; a real top-K list (refreshed every 5,000 events) stands in
        # for each listener's, so per-listener caches of the last list (if any) are sized right.
        cache: dict[str, Any] = {"n": -1, "recs": []}

        def cached(state: Any, k: int, now_ms: int, *a: Any, **kw: Any) -> Any:
            if cache["n"] < 0 or recommender.n_learned - cache["n"] >= 5000:
                cache["recs"] = real_recommend(state, k, now_ms, *a, **kw)
                cache["n"] = getattr(recommender, "n_learned", 0)
            return cache["recs"]

        recommender.recommend = cached  # type: ignore[method-assign]
    tbl: dict[str, Any] = {}
    writes = [0]
    now = [0.0]

    def submit(_: Any) -> None:
        writes[0] += 1

    proc = Processor(settings, recommender, tbl, submit, lambda _: None, clock=lambda: now[0])
    events: Iterator[PlayEvent]
    if source == "synthetic":
        # heavy listeners first (enough plays to fill the recent/seen rings: the worst case),
        # then every other listener arrives with one or a few short sessions
        heavy_users = max(1, users // 200)
        heavy = SessionTraffic(
            users=heavy_users,
            tracks=100_000,
            artists=10_000,
            session_plays=40,
            concurrent_sessions=heavy_users,
            seed=seed,
            prefix="heavy",
        ).events(heavy_users * 80)
        light = SessionTraffic(
            users=users - heavy_users,
            tracks=100_000,
            artists=10_000,
            session_plays=session_plays,
            concurrent_sessions=5_000,
            sequential_users=True,
            seed=seed + 1,
        ).events(max_events)
        events = itertools.chain(heavy, light)
    else:
        events = make_events(source, max_events)
    started = time.monotonic()
    n = 0
    bar = tqdm(
        total=users, desc="listeners with state", unit="user", file=sys.stderr, mininterval=0.5
    )
    for n, ev in enumerate(events, 1):
        now[0] = ev.ts_ms / 1000.0 + 1.0
        proc.process(Record("plays", 0, n, ev.user_id.encode(), encode_event(ev), ev.ts_ms))
        if n % 1000 == 0:
            bar.update(len(tbl) - bar.n)
            if len(tbl) >= users or time.monotonic() - started > max_seconds:
                break
    bar.update(len(tbl) - bar.n)
    bar.close()
    elapsed = time.monotonic() - started
    if not rank:
        recommender.recommend = real_recommend  # type: ignore[method-assign]
    fed = {
        "events": n,
        "seconds": elapsed,
        "events_per_s": n / elapsed,
        "writes": writes[0],
        "ranked_every_event": rank,
    }
    return tbl, recommender, proc, fed


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else value.to_dict()


def user_keyed(obj: Any, users: dict[str, Any], prefix: str, depth: int = 2) -> dict[str, Any]:
    """Attributes (up to ``depth`` levels down) that are mappings keyed by listener id."""
    found: dict[str, Any] = {}
    attrs = vars(obj) if hasattr(obj, "__dict__") else {}
    for name, value in attrs.items():
        if value is users:
            continue
        if isinstance(value, Mapping) and len(value) > 0:
            sample = list(itertools.islice(value.keys(), 50))
            if sum(1 for k in sample if isinstance(k, str) and k in users) >= 0.8 * len(sample):
                found[f"{prefix}.{name}"] = value
                continue
        if depth > 1 and hasattr(value, "__dict__") and not isinstance(value, type):
            found.update(user_keyed(value, users, f"{prefix}.{name}", depth - 1))
    return found


def user_side(
    tbl: dict[str, Any], proc: Processor, rec: Recommender, sample: int
) -> dict[str, Any]:
    codec = table_codec()
    key_codec = codecs.get_codec("json")
    keys = list(tbl)
    blobs = [(key_codec.dumps(k), codec.dumps(tbl[k])) for k in keys]
    value_bytes = [len(v) for _, v in blobs]
    key_bytes = [len(k) for k, _ in blobs]
    states = {k: _as_dict(tbl[k]) for k in keys[:: max(1, len(keys) // 50_000)]}
    plays = [d["plays_total"] for d in states.values()]
    # heap a memory-store table holds after a changelog restore: decode every value into a
    # fresh dict under tracemalloc (only the track ids resolve to the catalogue's strings)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    restored = {key_codec.loads(k): codec.loads(v) for k, v in blobs}
    restored_bytes = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    n = len(restored)
    del restored
    step = max(1, len(keys) // sample)
    sampled = keys[::step]
    # A listener's ring points at the catalogue's own track-id strings (parsing and
    # UserState.from_dict intern them): those are counted once, on the item side (the
    # vocabulary), not again for every listener who played the track.
    catalogue = frozenset(id(t) for t in rec.vocabulary.ids)
    live = [deep_size(k) + deep_size(tbl[k], shared=catalogue) for k in sampled]
    full = [
        k
        for k in keys
        if len(_as_dict(tbl[k])["seen"]) >= 64 and len(_as_dict(tbl[k])["recent"]) >= 30
    ]
    sat_vals = [len(codec.dumps(tbl[k])) for k in full]
    sat_live = [deep_size(tbl[k], shared=catalogue) for k in full[:sample]]
    # other per-listener structures the worker keeps (Processor caches, model user vectors)
    side = {**user_keyed(proc, tbl, "processor", 1), **user_keyed(rec, tbl, "recommender", 2)}
    side_bytes = {name: deep_size(m) for name, m in side.items()}
    side_per_user = {name: b / n for name, b in side_bytes.items()} if n else {}
    return {
        "users": n,
        "table_value_type": type(tbl[keys[0]]).__name__ if keys else None,
        "changelog_codec": type(codec).__name__,
        "plays_per_user": percentiles(plays),
        "serialized_value_bytes": percentiles(value_bytes),
        "serialized_key_bytes": percentiles(key_bytes),
        "restored_heap_bytes_per_user": restored_bytes / n if n else math.nan,
        "restored_heap_bytes_total": restored_bytes,
        "live_deep_bytes_per_user": percentiles(live),
        "full_ring_users": len(full),
        "full_ring_serialized_value_bytes": percentiles(sat_vals),
        "full_ring_live_deep_bytes": percentiles(sat_live),
        "other_per_user_structures_bytes": side_bytes,
        "other_per_user_structures_bytes_per_user": side_per_user,
        "total_live_bytes_per_user": percentiles(live)["mean"] + sum(side_per_user.values()),
        "sample_size": len(sampled),
    }


def item_side(rec: Recommender, tbl: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in FOOTPRINT_METHODS:
        fn = getattr(rec, name, None)
        if callable(fn):
            with contextlib.suppress(TypeError):
                out["recommender_footprint"] = {"method": name, "value": fn()}
            break
    user_maps = {id(m) for m in user_keyed(rec, tbl, "recommender", 2).values()}
    seen: set[int] = set(user_maps)  # user-side maps are counted on the user side
    components: dict[str, int] = {}
    n_factors = getattr(rec, "n_factors", None)
    item_matrix: tuple[str, Any] | None = None
    for attr, model in vars(rec).items():
        if not hasattr(model, "learn_one"):
            continue
        for sub, value in vars(model).items():
            if isinstance(value, np.ndarray) and value.ndim == 2 and "item" in sub:
                item_matrix = (f"{attr}.{sub}", value)
            size = deep_size(value, seen)
            if size > 1024:
                components[f"{attr}.{sub}"] = size
        if getattr(model, "n_factors", None):
            n_factors = int(model.n_factors)
    n_items = 0
    for model in vars(rec).values():
        vocab = getattr(model, "_vocab", None)
        if vocab is not None:
            n_items = max(n_items, len(vocab))
    if not n_items:
        fn = getattr(rec, "catalogue_size", None)
        n_items = int(fn()) if callable(fn) else 0
    d = int(n_factors or 32)
    dense = n_items * d * 4
    item_bytes = sum(components.values())
    out.update(
        {
            "n_items": n_items,
            "n_factors": d,
            "n_factors_source": "recommender" if n_factors else "assumed (ImplicitMF default 32)",
            "dense_float32_bytes": dense,
            "item_side_deep_bytes": item_bytes,
            "item_side_ratio_to_dense": item_bytes / dense if dense else math.nan,
            "item_components_bytes": components,
            "sizing_estimate_bytes": model_memory_bytes(rec),
        }
    )
    if item_matrix is not None:
        name, m = item_matrix
        out["item_factor_matrix"] = {
            "attribute": name,
            "shape": list(m.shape),
            "dtype": str(m.dtype),
            "rows_used": n_items,
            "nbytes": int(m.nbytes),
            "ratio_to_dense": m.nbytes / dense if dense else math.nan,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m load_tests.memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--users", type=int, default=100_000, help="listeners with state")
    ap.add_argument("--max-events", type=int, default=3_000_000)
    ap.add_argument("--seconds", type=float, default=900.0, help="max seconds feeding")
    ap.add_argument("--rank", action="store_true", help="also rank every event (slow)")
    ap.add_argument(
        "--source", choices=("synthetic", "lastfm", "movielens", "spotify"), default="synthetic"
    )
    ap.add_argument("--sample", type=int, default=5000, help="users deep-walked")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument(
        "--session-plays",
        type=float,
        default=3.0,
        help="mean plays per session of the (non-heavy) synthetic listeners",
    )
    args = ap.parse_args(argv)
    rid = run_id("p3")
    label = source_label(args.source)
    tbl, rec, proc, fed = feed(
        args.users,
        args.max_events,
        args.seconds,
        args.rank,
        args.source,
        args.seed,
        args.session_plays,
    )
    print(
        f"fed {fed['events']:,} events in {fed['seconds']:.0f} s ({fed['events_per_s']:,.0f}/s): "
        f"{len(tbl):,} listeners",
        file=sys.stderr,
    )
    users = user_side(tbl, proc, rec, args.sample)
    items = item_side(rec, tbl)
    report = Report(
        "memory",
        rid,
        {
            "scenario": "P3 memory",
            "traffic": label,
            "feed": fed,
            "user_state": users,
            "item_side": items,
        },
    )
    path = report.write()
    print_summary(label, users, items)
    print(f"report: {path}")
    return 0


def print_summary(label: str, users: dict[str, Any], items: dict[str, Any]) -> None:
    sv, lv = users["serialized_value_bytes"], users["live_deep_bytes_per_user"]
    fs, fl = users["full_ring_serialized_value_bytes"], users["full_ring_live_deep_bytes"]
    nan = math.nan
    print(
        f"\nP3 memory ({label}; {users['users']:,} listeners, median "
        f"{users['plays_per_user']['p50']:.0f} plays each, {users['full_ring_users']:,} with full "
        f"recent/seen rings; table holds {users['table_value_type']})"
    )
    rows = [
        [
            f"changelog value ({users['changelog_codec']})",
            sv["mean"],
            sv["p50"],
            sv["p99"],
            sv["max"],
        ],
        ["  listeners with full rings", fs["mean"], fs["p50"], fs["p99"], fs["max"]],
        [
            "table heap after restore (tracemalloc)",
            users["restored_heap_bytes_per_user"],
            nan,
            nan,
            nan,
        ],
        ["live table entry, deep size", lv["mean"], lv["p50"], lv["p99"], lv["max"]],
        ["  listeners with full rings", fl["mean"], fl["p50"], fl["p99"], fl["max"]],
    ]
    for name, b in users["other_per_user_structures_bytes_per_user"].items():
        rows.append([f"+ {name} (per listener)", b, nan, nan, nan])
    rows.append(["= live total per listener", users["total_live_bytes_per_user"], nan, nan, nan])
    print(table(rows, ["bytes per listener (target <= 2048)", "mean", "p50", "p99", "max"]))
    print(
        f"\nitem side: {items['n_items']:,} items; models {items['item_side_deep_bytes']:,} B vs dense "
        f"float32 {items['n_items']:,} x {items['n_factors']} x 4 = {items['dense_float32_bytes']:,} B "
        f"-> {items['item_side_ratio_to_dense']:.2f}x (target <= 1.5x)"
    )
    if "item_factor_matrix" in items:
        m = items["item_factor_matrix"]
        print(
            f"  {m['attribute']}: {m['shape']} {m['dtype']} = {m['nbytes']:,} B "
            f"({m['ratio_to_dense']:.2f}x dense float32 of the rows in use)"
        )
    for k, v in sorted(items["item_components_bytes"].items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {k}: {v:,} B")
    if "recommender_footprint" in items:
        print(f"  recommender says: {items['recommender_footprint']}")
    print(f"  stream.core.sizing estimate (what /metrics exports): {items['sizing_estimate_bytes']}")


if __name__ == "__main__":
    sys.exit(main())
