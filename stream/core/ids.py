"""One shared string per id, without the interpreter's interned-strings table.

Ids repeat: a track id is in the vocabulary, in the recent list of every listener who
played it, in the artist map; a listener id is in the session table, its LRU order and
MF's factors. Parsing used to ``sys.intern`` every id so that all of those hold one string
object (8 bytes a reference, not a ~60-byte copy). But the interpreter keeps its interned
strings in ONE dict: under hostile ids (every play a new listener, track and artist) it took
~4 new keys per play and its growths, one C call each with the GIL held, rehashed ~2M keys
at once: 35-38, 63-68 and 122-134 ms at 159k, 334k and 684k junk plays
(docs/benchmarks.md, "The junk-ids drill, session 15").

:data:`IDS` does the same sharing in 64 tables picked by ``hash(text) & 63``
(:data:`stream.core.shards.MASK`), so a growth rehashes ~1/64 of the ids, and the tables
cross their thresholds at different plays. It is bounded: a table that takes an id over its
share of :data:`ID_CACHE_CAP` is cleared but for that id (one table, ~1/64 of the ids).
Clearing only loses sharing, never correctness: the strings are equal, the ids live
elsewhere keep their object, and the next parse of a cleared id makes it canonical again
(a listener's ring may then hold two equal strings for one track for a while). A cleared
table forgets junk and live ids alike, which an LRU would not, but an LRU costs a move per
hit on every play; at the default cap (2^21, over the ~1.1-1.6M listener, track and artist
ids the default caps keep) tables clear only under junk.

Interning did not keep its strings alive (the table forgets a string when its last other
reference goes); this cache does, up to its cap: ids the models have evicted stay until
their table clears (``python -m load_tests.ids_cost --memory``: ~23 B of table and ~88 B
of string per id; docs/benchmarks.md "The cap formula"). Event ids and nonces are unique
per message, and a session id is kept only while its session lasts: they are not shared.
Nor is any id over :data:`SHARED_ID_MAX_LEN` characters: the cap counts ids, so that bounds
the strings the tables can keep alive (review15c: with 256-character session ids shared,
~1.1 KB a play stayed, ~2.35 GB at the cap).

Hot paths may inline :meth:`IdCache.canonical` (``stream.core.events.check_id`` does):
``table = IDS.tables[hash(text) & MASK]``, ``found = table.setdefault(text, text)``, and
when ``found is text`` and the table holds over :data:`ID_TABLE_SHARE`, :meth:`IdCache.trim`.
"""

from __future__ import annotations

from typing import Final

from stream.core.shards import MASK, NSHARDS

#: ids kept shared, over all 64 tables (each table holds at most 1/64 of it)
ID_CACHE_CAP: Final = 1 << 21
#: the most ids one of :data:`IDS`'s tables holds
ID_TABLE_SHARE: Final = ID_CACHE_CAP // NSHARDS
#: longer ids are not shared: the cap counts ids, so this bounds the bytes a table pins
#: (a 64-character id is a ~113-byte string in ASCII, ~330 in 4-byte characters)
SHARED_ID_MAX_LEN: Final = 64


class IdCache:
    """64 bounded ``str -> str`` tables: :meth:`canonical` returns the first equal string
    it was given (while its table has not been cleared since)."""

    __slots__ = ("tables", "share", "clears")

    def __init__(self, cap: int = ID_CACHE_CAP) -> None:
        if cap < NSHARDS:
            raise ValueError(f"IdCache cap must be >= {NSHARDS}, got {cap}")
        self.tables: list[dict[str, str]] = [{} for _ in range(NSHARDS)]
        self.share = cap // NSHARDS  # the most ids one table holds
        self.clears = 0  # tables cleared at their share, ever

    def canonical(self, text: str) -> str:
        """The shared string equal to ``text`` (``text`` itself the first time, and
        always for a text over :data:`SHARED_ID_MAX_LEN` characters)."""
        if len(text) > SHARED_ID_MAX_LEN:
            return text
        table = self.tables[hash(text) & MASK]
        found = table.setdefault(text, text)  # one C call on a hit and on a miss
        if found is text and len(table) > self.share:
            self.trim(table, text)
        return found

    def trim(self, table: dict[str, str], text: str) -> None:
        """``table`` (which has just taken ``text`` over its share) cleared but for
        ``text``."""
        table.clear()
        table[text] = text
        self.clears += 1

    def __len__(self) -> int:
        return sum(len(t) for t in self.tables)


#: the process's shared ids (parsing, checkpoint and changelog restores)
IDS: Final = IdCache()
canonical: Final = IDS.canonical
