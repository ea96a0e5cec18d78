"""``python -m load_tests.ids_cost``: what the shared-ids cache (stream.core.ids) costs a
play against ``sys.intern``, which it replaced in parsing.

1. ``parse_event`` per play over pre-encoded plays, in whichever tree ``PYTHONPATH`` picks
   (run it in both trees, alternating): "repeat" plays draw from 2,000 listeners and 5,000
   tracks (the ids are already shared: hits), "junk" plays bring a new listener, track,
   artist and event id each (misses). The minimum of 7 repeats of 20,000 plays.
2. In one process (needs the branch's tree): ``sys.intern`` against ``IDS.canonical`` and
   the inlined lookup ``check_id`` makes, per id, on hits and on misses (fresh strings).
3. ``--memory``: bytes per id of the full cache (:func:`memory`).
"""

from __future__ import annotations

import sys
import timeit
from collections.abc import Callable

import orjson

N = 20_000
NOW = 1_700_000_000_000


def _best(fn: Callable[[], object], per: int = N) -> float:
    return min(timeit.repeat(fn, number=1, repeat=7)) / per * 1e9


def _plays(junk: bool, offset: int) -> list[bytes]:
    out = []
    for i in range(N):
        j = offset + i
        user, track = (f"j0000000-ju{j}", f"j0000000-jt{j}") if junk else (
            f"listener-{i % 2000}", f"track-{(i * 7) % 5000}")
        out.append(orjson.dumps({
            "user_id": user, "track_id": track, "ts": NOW, "ms_played": 100_000,
            "event_id": f"j0000000-je{j}", "artist_id": f"artist-{j if junk else i % 900}",
            "context": "playlist"}))
    return out


def _parse_all(parse: Callable[..., object], raws: list[bytes]) -> None:
    for raw in raws:
        parse(raw, now_ms=NOW)


def parse_cost() -> dict[str, float]:
    from stream.core.events import parse_event

    out = {}
    for kind in ("repeat", "junk"):
        batches = iter([_plays(kind == "junk", r * N) for r in range(8)])
        _parse_all(parse_event, next(batches))  # warm: the repeat ids are shared from here on
        out[kind] = round(_best(lambda b=batches: _parse_all(parse_event, next(b))) / 1e3, 3)
    return out


def op_cost() -> dict[str, float]:
    from stream.core.ids import ID_TABLE_SHARE, IdCache
    from stream.core.shards import MASK

    cache = IdCache()
    tables, trim = cache.tables, cache.trim
    hot = [f"track-{i}" for i in range(N)]
    for t in hot:
        sys.intern(t)
        cache.canonical(t)
    fresh_hot = ["".join(list(t)) for t in hot]  # equal, other objects: hits
    rounds = [[f"j{r}-jt{i}" for i in range(N)] for r in range(24)]
    canonical, intern = cache.canonical, sys.intern

    def inlined(ids: list[str]) -> None:
        for t in ids:
            table = tables[hash(t) & MASK]
            found = table.setdefault(t, t)
            if found is t and len(table) > ID_TABLE_SHARE:
                trim(table, t)

    def loop(fn: Callable[[str], str], ids: list[str]) -> Callable[[], None]:
        def run() -> None:
            for t in ids:
                fn(t)
        return run

    misses = iter(rounds)
    return {
        "hit sys.intern ns": round(_best(loop(intern, fresh_hot)), 1),
        "hit canonical ns": round(_best(loop(canonical, fresh_hot)), 1),
        "hit inlined ns": round(_best(lambda: inlined(fresh_hot)), 1),
        "miss sys.intern ns": round(_best(lambda: loop(intern, next(misses))()), 1),
        "miss canonical ns": round(_best(lambda: loop(canonical, next(misses))()), 1),
        "miss inlined ns": round(_best(lambda: inlined(next(misses))), 1),
    }


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def memory() -> dict[str, float]:
    """Bytes per id of the full process cache (ID_CACHE_CAP ids of the junk drill's form):
    the tables alone (the strings held elsewhere too, as live ids are), and tables plus
    strings (ids nothing else holds: the models evicted them), against ``sys.intern`` of
    the same live strings (its table forgets a string when the string dies)."""
    from stream.core.ids import ID_CACHE_CAP, IdCache

    base = _rss()
    live = [f"j0000000-ju{i}" for i in range(ID_CACHE_CAP)]
    strings = _rss() - base
    before = _rss()
    for t in live:
        sys.intern(t)
    interned = _rss() - before
    del live
    before = _rss()
    cache = IdCache()
    for i in range(ID_CACHE_CAP):
        cache.canonical(f"j0000001-ju{i}")
    owned = _rss() - before
    n = ID_CACHE_CAP
    return {"ids": n, "string B": round(strings / n, 1), "sys.intern table B": round(
        interned / n, 1), "cache table + string B": round(owned / n, 1),
        "cache table B": round((owned - strings) / n, 1), "cache clears": cache.clears}


if __name__ == "__main__":
    if sys.argv[1:] == ["--memory"]:
        print(memory())
        raise SystemExit(0)
    print("parse_event us per play", parse_cost(), flush=True)
    try:
        print("per id", op_cost())
    except ImportError:
        print("per id: this tree has no stream.core.ids")
