"""``python -m load_tests.shard_cost``: what the sharded maps (stream.core.shards) add to one
play, from the lookups a play makes (counted on the branch with ``sys.setprofile`` over
``process_batch`` of the synthetic traffic, and from the ranking code) timed one by one,
sharded against the plain dict / OrderedDict they replaced: the minimum of 7 repeats of
20,000 keys each, in one process (the whole-processor pairs, load_tests/processor_cost.py,
are too noisy on a shared box to resolve ~1 us).

Per play (fixed ranker): the session order's move (1), the MF listener's get + move (1),
its reads (``export_user``, ``user_vector``, the ``in`` of ``learn_one``: 3), the track's
row (``predict_one`` x 2, ``Vocabulary.add``, co-occurrence: 4), the history's rows in
co-occurrence learning (~5), the artist's set (1); per ranking (0.37 per play): the history's
rows (``_query_rows``, ~10) and the artist of every listed candidate (``_results_from``, ~25).
"""

from __future__ import annotations

import timeit
from collections import OrderedDict
from collections.abc import Callable

from stream.core.shards import MASK, ShardedDict, ShardedLRU

N = 20_000
#: (name, per play, plain op, sharded op) -- each op over N keys
PER_PLAY = {"session move": 1.0, "mf get+move": 1.0, "mf reads": 3.0, "track row": 4.0,
            "history rows (learn)": 5.0, "artist set": 1.0,
            "history rows (rank)": 0.37 * 10, "artist reads (rank)": 0.37 * 25}


def _best(fn: Callable[[], object]) -> float:
    return min(timeit.repeat(fn, number=1, repeat=7)) / N * 1e9


def main() -> None:
    keys = [f"j0000000-ju{i}" for i in range(N)]
    od: OrderedDict[str, None] = OrderedDict.fromkeys(keys)
    lru: ShardedLRU[str, None] = ShardedLRU((k, None) for k in keys)
    d = dict.fromkeys(keys, 1)
    sd: ShardedDict[str, int] = ShardedDict((k, 1) for k in keys)
    shards, lshards, stamps, nxt = sd.shards, lru.shards, lru.stamps, lru.next_stamp
    get = d.get

    def od_move() -> None:
        for k in keys:
            od[k] = None
            od.move_to_end(k)

    def lru_move() -> None:  # pipeline._apply_session's inlined path
        for k in keys:
            h = hash(k) & MASK
            s = lshards[h]
            if k in s:
                s.move_to_end(k)
                stamps[h][k] = nxt()
            else:
                lru.touch(k, None)

    def od_getmove() -> None:
        for k in keys:
            od.get(k)
            od.move_to_end(k)

    def lru_getmove() -> None:  # ImplicitMF.learn_step's inlined path
        for k in keys:
            h = hash(k) & MASK
            s = lshards[h]
            s.get(k)
            s.move_to_end(k)
            stamps[h][k] = nxt()

    def plain_get() -> None:
        for k in keys:
            get(k)

    def sharded_get() -> None:
        for k in keys:
            shards[hash(k) & MASK].get(k)

    def plain_set() -> None:
        for k in keys:
            d[k] = 1

    def sharded_set() -> None:
        for k in keys:
            shards[hash(k) & MASK][k] = 1

    pairs = {"session move": (od_move, lru_move), "mf get+move": (od_getmove, lru_getmove),
             "artist set": (plain_set, sharded_set)}
    total = 0.0
    for name, per_play in PER_PLAY.items():
        plain, sharded = pairs.get(name, (plain_get, sharded_get))
        a, b = _best(plain), _best(sharded)
        total += (b - a) * per_play
        print(f"{name:22s} x{per_play:5.2f}/play: plain {a:6.1f} ns, sharded {b:6.1f} ns, "
              f"+{(b - a) * per_play:6.1f} ns/play", flush=True)
    print(f"total: +{total / 1000:.2f} us per play")


if __name__ == "__main__":
    main()
