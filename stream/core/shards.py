"""Maps kept in 64 shards by key hash, so that no single hash-table growth rehashes them all.

A CPython dict grows its table when the entries ever inserted (deleted ones included) reach
2/3 of its size: one C call that rehashes every live key with the GIL held. At 700k keys
that is ~25 ms for a dict and ~70 ms for an OrderedDict (``python -m load_tests.dict_resize``).
A capped map at 500k live keys, fed one new key per play, grows like that again and again,
and under hostile ids (every play a new listener and a new track) ten such maps crossed the
same threshold within a few plays: one loop turn of 258 ms (docs/benchmarks.md, "The
junk-ids drill, session 14"). Here each map is 64 small tables picked by ``hash(key) & 63``:
a growth rehashes ~1/64 of the keys (under 1 ms at 500k), and the shards of one map cross
their thresholds at different plays (binomial spread), not in one turn.

- :class:`ShardedDict`: a dict's mapping contract; iteration goes shard by shard (it
  follows ``hash``, so not insertion order and not the same across processes: use it where
  nothing depends on the order, e.g. an index).
- :class:`ShardedLRU`: an OrderedDict's contract as the LRU maps use it, with the same
  order everywhere: every key carries a stamp of its last move (an int), so iteration (a
  merge of the shards by stamp), ``popitem`` and :meth:`ShardedLRU.drop_oldest` (the least
  recent key, through a heap of the shards' fronts) are exactly an OrderedDict's, below
  and at a cap. The stamps cost one more small dict entry and int per key (~61 bytes).

Hot paths may inline the shard pick: ``m.shards[hash(key) & MASK]`` is the dict that holds
``key``. For a :class:`ShardedLRU` an inlined change must keep its stamps too: moving an
existing key to the end is ``shard.move_to_end(key)`` then ``stamps[h][key] =
next_stamp()``; anything that adds or removes a key goes through its methods (the count and
the heap of fronts).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable, Iterator, KeysView, MutableMapping
from itertools import chain, count
from typing import Any, Final, Generic, TypeVar, overload

#: shards per map (a power of two): a growth rehashes ~1/64 of the keys
NSHARDS: Final = 64
MASK: Final = NSHARDS - 1

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")

_MISSING: Any = object()


class _Sharded(MutableMapping[K, V], Generic[K, V]):
    """What both maps share: ``shards[hash(key) & MASK]`` holds ``key``."""

    __slots__ = ("shards",)
    shards: list[Any]  # dicts (ShardedDict) or OrderedDicts (ShardedLRU)

    def __getitem__(self, key: K) -> V:
        value: V = self.shards[hash(key) & MASK][key]
        return value

    @overload
    def get(self, key: K, /) -> V | None: ...
    @overload
    def get(self, key: K, default: V | D, /) -> V | D: ...

    def get(self, key: K, default: Any = None) -> Any:
        return self.shards[hash(key) & MASK].get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.shards[hash(key) & MASK]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} keys)"


class _Keys(KeysView[K]):
    """A :class:`ShardedDict`'s keys view, iterated by the map's own ``__iter__``."""

    __slots__ = ("_table",)

    def __init__(self, table: ShardedDict[K, Any]) -> None:
        super().__init__(table)
        self._table = table

    def __iter__(self) -> Iterator[K]:
        return iter(self._table)


class ShardedDict(_Sharded[K, V]):
    """A dict in :data:`NSHARDS` dicts by ``hash(key) & MASK`` (see the module)."""

    __slots__ = ()

    def __init__(self, items: Iterable[tuple[K, V]] = ()) -> None:
        self.shards: list[dict[K, V]] = [{} for _ in range(NSHARDS)]
        shards = self.shards
        for key, value in items:
            shards[hash(key) & MASK][key] = value


    def __setitem__(self, key: K, value: V) -> None:
        self.shards[hash(key) & MASK][key] = value

    def __delitem__(self, key: K) -> None:
        del self.shards[hash(key) & MASK][key]


    def pop(self, key: K, default: Any = _MISSING) -> Any:
        shard = self.shards[hash(key) & MASK]
        return shard.pop(key) if default is _MISSING else shard.pop(key, default)

    def setdefault(self, key: K, default: Any = None) -> Any:
        return self.shards[hash(key) & MASK].setdefault(key, default)

    def __len__(self) -> int:
        return sum(map(len, self.shards))

    def __bool__(self) -> bool:
        return any(self.shards)

    def __iter__(self) -> Iterator[K]:
        return chain.from_iterable(self.shards)

    def keys(self) -> _Keys[K]:
        """A keys view whose iteration is the shards' own (C), not a generator: ``list(
        table.keys())`` of the 500k-listener session table (``keys_snapshot``) took 169 ms
        of the loop in the 1M junk drill through ``KeysView``'s generator."""
        return _Keys(self)

    def clear(self) -> None:
        for shard in self.shards:
            shard.clear()

    def update(self, other: Any = (), /, **kwargs: V) -> None:
        """Set every (key, value) of ``other`` (a mapping or pairs), as ``dict.update``."""
        shards = self.shards
        pairs = other.items() if hasattr(other, "items") else other
        for key, value in chain(pairs, kwargs.items()):
            shards[hash(key) & MASK][key] = value



class ShardedLRU(_Sharded[K, V]):
    """An OrderedDict in :data:`NSHARDS` OrderedDicts by ``hash(key) & MASK``, with the
    global order kept exactly (see the module): ``lru[key] = value`` keeps an existing
    key's place (as an OrderedDict does); :meth:`touch` and :meth:`move_to_end` move a key;
    iteration, ``popitem`` and :meth:`drop_oldest` follow the global order. ``len`` is a
    count kept by every change (O(1))."""

    __slots__ = ("stamps", "size", "_fronts", "next_stamp", "_first")

    def __init__(self, items: Iterable[tuple[K, V]] = ()) -> None:
        self.shards: list[OrderedDict[K, V]] = [OrderedDict() for _ in range(NSHARDS)]
        #: key -> its place in the global order (ascending: least recent first)
        self.stamps: list[dict[K, int]] = [{} for _ in range(NSHARDS)]
        self.size = 0
        #: a heap of (stamp, shard) holding, for every non-empty shard, at least one entry
        #: no later than that shard's least recent key (stale entries are fixed on the way)
        self._fronts: list[tuple[int, int]] = []
        #: the stamp of a key made the most recent (a hot path that inlines
        #: ``move_to_end(key)`` sets ``stamps[h][key] = next_stamp()`` after the shard's)
        self.next_stamp = count(1).__next__
        self._first = count(-1, -1).__next__  # and of keys made the least recent
        for key, value in items:
            self[key] = value



    def __setitem__(self, key: K, value: V) -> None:
        h = hash(key) & MASK
        shard = self.shards[h]
        if key not in shard:
            stamp = self.stamps[h][key] = self.next_stamp()
            if not shard:
                self._push_front(stamp, h)
            self.size += 1
        shard[key] = value

    def touch(self, key: K, value: V, cap: int = 0) -> K | None:
        """``self[key] = value`` and make ``key`` the most recent; then, with ``cap`` and
        more than ``cap`` keys, drop the least recent. Returns the dropped key (or None)."""
        h = hash(key) & MASK
        shard = self.shards[h]
        stamp = self.stamps[h][key] = self.next_stamp()
        if key in shard:
            shard[key] = value
            shard.move_to_end(key)
        else:
            if not shard:
                self._push_front(stamp, h)
            shard[key] = value
            self.size += 1
        if cap and self.size > cap:
            return self.drop_oldest()[0]
        return None

    def move_to_end(self, key: K, last: bool = True) -> None:
        h = hash(key) & MASK
        self.shards[h].move_to_end(key, last)
        if last:
            self.stamps[h][key] = self.next_stamp()
        else:
            stamp = self.stamps[h][key] = self._first()
            self._push_front(stamp, h)

    def _push_front(self, stamp: int, h: int) -> None:
        """A shard's new front; the heap is rebuilt (one entry per non-empty shard) once
        stale entries pass 4 per shard, so it stays bounded without any drop (a long
        seeding of restored listeners, forget churn)."""
        fronts = self._fronts
        heapq.heappush(fronts, (stamp, h))
        if len(fronts) > 4 * NSHARDS:
            self._rebuild_fronts()

    def _rebuild_fronts(self) -> None:
        stamps = self.stamps
        self._fronts[:] = [(stamps[h][next(iter(s))], h) for h, s in enumerate(self.shards) if s]
        heapq.heapify(self._fronts)

    def __delitem__(self, key: K) -> None:
        h = hash(key) & MASK
        del self.shards[h][key]
        del self.stamps[h][key]
        self.size -= 1

    def pop(self, key: K, default: Any = _MISSING) -> Any:
        h = hash(key) & MASK
        shard = self.shards[h]
        if key in shard:
            del self.stamps[h][key]
            self.size -= 1
            return shard.pop(key)
        if default is _MISSING:
            raise KeyError(key)
        return default

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return self.size > 0

    def __iter__(self) -> Iterator[K]:
        """Least recent first (a merge of the shards by stamp)."""
        stamps = self.stamps
        merged = heapq.merge(*[zip(map(stamps[h].__getitem__, shard), shard, strict=True)
                               for h, shard in enumerate(self.shards) if shard])
        return (key for _, key in merged)

    def drop_oldest(self) -> tuple[K, V]:
        """The least recent key and its value, removed (``popitem(last=False)``): the
        front of the shard whose front is the oldest, found through a heap of the shards'
        fronts (O(log 64)), not by looking at every shard."""
        fronts, shards, stamps = self._fronts, self.shards, self.stamps
        if len(fronts) > 2 * NSHARDS:  # stale entries: one per non-empty shard again
            self._rebuild_fronts()
        while fronts:
            stamp, h = fronts[0]
            shard = shards[h]
            if not shard:
                heapq.heappop(fronts)
                continue
            key = next(iter(shard))
            front = stamps[h][key]
            if front != stamp:  # the entry is stale: the shard's front moved on
                heapq.heapreplace(fronts, (front, h))
                continue
            value = shard.pop(key)
            del stamps[h][key]
            self.size -= 1
            if shard:
                heapq.heapreplace(fronts, (stamps[h][next(iter(shard))], h))
            else:
                heapq.heappop(fronts)
            return key, value
        raise KeyError("drop_oldest(): map is empty")

    def popitem(self, last: bool = True) -> tuple[K, V]:
        """The most (``last=True``: a look at every shard's end) or least recent key and
        its value, removed."""
        if not last:
            return self.drop_oldest()
        stamps = self.stamps
        ends = [(stamps[h][next(reversed(s))], h) for h, s in enumerate(self.shards) if s]
        if not ends:
            raise KeyError("popitem(): map is empty")
        h = max(ends)[1]
        key, value = self.shards[h].popitem(True)
        del stamps[h][key]
        self.size -= 1
        return key, value

    def clear(self) -> None:
        for shard, stamps in zip(self.shards, self.stamps, strict=True):
            shard.clear()
            stamps.clear()
        self._fronts.clear()
        self.size = 0

