"""Streaming session-kNN with STAN's weights (Garg et al., SIGIR 2019; V-STAN in Ludewig et
al. 2021): the listener's current session is compared with recent sessions of everyone that
share a track with it, and the tracks of the most similar ones are recommended.

Scoring a query session ``s`` (its last ``query_window`` tracks, oldest first, length l):

- position weight of the query track at 1-based position p: ``w1 = exp((p - l) / λ1)``;
- a candidate neighbour session n (one of the ``sample`` most recent sessions that contain
  some query track; the listener's own open session excluded) gets
  ``sim(s, n) = Σ_{i ∈ s ∩ n} w1(i) / sqrt(l · |n|) · exp(-(t(s) - t(n)) / λ2)`` with t the
  time of a session's last play (recency of the neighbour);
- the ``k`` most similar neighbours vote: a track j at position q of neighbour n gets
  ``sim(s, n) · exp(-|q - m| / λ3)`` where m is the position in n of the matched track
  (the most recent query track n contains).

A λ of ``None`` turns that weight off (``w = 1``): with all three off this is plain
session-kNN (``SKNN``; :meth:`SessionKNN.score` with ``plain=True``).

Memory is bounded: at most ``max_sessions`` sessions of at most ``session_length`` tracks
(``max_sessions · (4 · session_length + 24)`` bytes, the oldest session recycled first), and
per track a ring of its ``sample`` most recent sessions in one arena of int64 serials
(``<= 2 · 8 · sample`` bytes per track, ``16 · Σ_tracks min(sessions of the track, sample)``
in all; the arena is compacted when holes pass half). Learning costs one compiled call per
play; a query one compiled call that reads at most ``query_window · sample`` postings and
``session_length`` tracks per candidate session.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Final

import numba
import numpy as np
import numpy.typing as npt

from stream.core.models._kernels import _top_n
from stream.core.models._state import (
    ID_LEN,
    INT_LIMIT,
    decode_strings,
    encode_strings,
    get_array,
    get_field,
)
from stream.core.models._vocab import (
    EvictionPlan,
    EvictionSteps,
    IntArray,
    Vocabulary,
    VocabularyModel,
    drain,
    grow_rows,
)
from stream.core.models.base import FloatArray, Interaction, check_positive

_jit: Any = numba.njit(cache=True, nogil=True)
Int32Array = npt.NDArray[np.int32]

#: the largest ``query_window`` accepted (constructor and checkpoint): the position table
#: (:meth:`SessionKNN.position_table`) holds up to ``query_window ** 2`` floats (8 MB at
#: 1000), and a query is the listener's recent plays anyway (``max_recent``, 30 by default)
MAX_QUERY_WINDOW: Final = 1000

_FIRST_CAP = 4


@_jit
def _post_add(p_start, p_size, p_cap, p_head, arena, used, row, serial, sample):  # type: ignore[no-untyped-def]
    """Append ``serial`` to track ``row``'s ring of recent sessions; returns the fill mark."""
    c = p_cap[row]
    n = p_size[row]
    if c == 0:
        c = min(_FIRST_CAP, sample)
        p_start[row] = used
        p_cap[row] = c
        used += c
    if n < c:
        arena[p_start[row] + n] = serial
        p_size[row] = n + 1
        return used
    if c < sample:  # move to a slice twice as large at the free end
        new_c = min(2 * c, sample)
        s = p_start[row]
        for i in range(n):
            arena[used + i] = arena[s + i]
        p_start[row] = used
        p_cap[row] = new_c
        arena[used + n] = serial
        p_size[row] = n + 1
        return used + new_c
    h = p_head[row]  # full ring: overwrite the oldest
    arena[p_start[row] + h] = serial
    p_head[row] = (h + 1) % c
    return used


@_jit
def stan_learn(items, lengths, times, slot, row, ts, p_start, p_size, p_cap, p_head, arena,  # type: ignore[no-untyped-def]
               used, serial, sample):
    """Append track ``row`` to session ``slot`` (a repeat moves to the end), index the
    session under the track; returns the arena fill mark."""
    n = lengths[slot]
    width = items.shape[1]
    found = -1
    for p in range(n):
        if items[slot, p] == row:
            found = p
            break
    if found >= 0:
        for p in range(found, n - 1):
            items[slot, p] = items[slot, p + 1]
        items[slot, n - 1] = row
    else:
        if n < width:
            items[slot, n] = row
            lengths[slot] = n + 1
        else:
            for p in range(width - 1):
                items[slot, p] = items[slot, p + 1]
            items[slot, width - 1] = row
        used = _post_add(p_start, p_size, p_cap, p_head, arena, used, row, serial, sample)
    times[slot] = ts
    return used


@_jit
def best_order(sims, k):  # type: ignore[no-untyped-def]
    """``np.argsort(-sims, kind="mergesort")[:k]`` (the ``k`` best, ties to the earlier
    index) without sorting all of ``sims``: a heap picks them, then only they are sorted."""
    best = _top_n(np.arange(len(sims)), sims, min(k, len(sims)))
    best.sort()
    return best[np.argsort(-sims[best], kind="mergesort")]


@_jit
def stan_query(q_rows, q_w, serials, items, lengths, times, p_start, p_size, arena, now,  # type: ignore[no-untyped-def]
               own, k, inv_l2, inv_l3, qmark, slot_mark, acc, touched):
    """Accumulate STAN scores into ``acc`` (all zero before) for the query tracks
    ``q_rows`` (oldest first, weights ``q_w``); returns how many rows ``touched`` lists.
    ``qmark`` (all -1) and ``slot_mark`` (all False) are left as found."""
    nq = q_rows.shape[0]
    cand = candidate_sessions(q_rows, serials, p_start, p_size, arena, own, qmark, slot_mark)
    nc = len(cand)
    sims = np.zeros(nc)
    match = np.zeros(nc, dtype=np.int64)
    for c in range(nc):
        slot = cand[c]
        slot_mark[slot] = False
        num = 0.0
        best_q = -1
        best_p = 0
        ln = lengths[slot]
        for p in range(ln):
            qi = qmark[items[slot, p]]
            if qi >= 0:
                num += q_w[qi]
                if qi > best_q:
                    best_q = qi
                    best_p = p
        if best_q < 0 or ln == 0:
            continue
        age = now - times[slot]
        if age < 0:
            age = 0
        sims[c] = num / math.sqrt(nq * ln) * math.exp(-age * inv_l2)
        match[c] = best_p
    order = best_order(sims, k)
    # exp(-d / λ3) for every distance d a session can hold (the same float as computing it
    # per track: one exp per distance instead of one per neighbour track)
    width = items.shape[1]
    by_distance = np.empty(width + 1)
    for d in range(width + 1):
        by_distance[d] = math.exp(-d * inv_l3)
    nt = vote(order, sims, cand, match, items, lengths, by_distance, qmark, acc, touched)
    for qi in range(nq):
        qmark[q_rows[qi]] = -1
    return nt


@_jit
def candidate_sessions(q_rows, serials, p_start, p_size, arena, own, qmark, slot_mark):  # type: ignore[no-untyped-def]
    """The live sessions (slots) other than ``own`` that hold a track of ``q_rows``, each
    once, in posting order. Marks every query row in ``qmark`` with its query index and
    every returned slot in ``slot_mark``: the caller clears both."""
    n_slots = serials.shape[0]
    nq = q_rows.shape[0]
    total = 0
    for qi in range(nq):
        r = q_rows[qi]
        qmark[r] = qi
        total += p_size[r]
    cand = np.empty(total, dtype=np.int64)
    nc = 0
    for qi in range(nq):
        r = q_rows[qi]
        s = p_start[r]
        for i in range(p_size[r]):
            serial = arena[s + i]
            slot = serial % n_slots
            if serials[slot] != serial or serial == own or slot_mark[slot]:
                continue
            slot_mark[slot] = True
            cand[nc] = slot
            nc += 1
    return cand[:nc]


@_jit
def vote(order, sims, cand, match, items, lengths, by_distance, qmark, acc, touched):  # type: ignore[no-untyped-def]
    """STAN's vote of the neighbour sessions ``order`` (best first): each adds its
    similarity times ``by_distance`` of each track's distance from the matched item to
    ``acc`` (query rows, marked in ``qmark``, excluded); returns how many rows
    ``touched`` lists."""
    nt = 0
    for j in range(len(order)):
        c = order[j]
        sim = sims[c]
        if sim <= 0.0:
            break
        slot = cand[c]
        m = match[c]
        for p in range(lengths[slot]):
            r = items[slot, p]
            if qmark[r] >= 0:
                continue
            if acc[r] == 0.0:
                touched[nt] = r
                nt += 1
            acc[r] += sim * by_distance[abs(p - m)]
    return nt


@_jit
def _renumber_sessions(items, lengths, remap):  # type: ignore[no-untyped-def]
    """Renumber every session's live tracks in place through ``remap`` (old row -> new
    row, -1 or beyond ``remap``: evicted, dropped, the others keep their order); the
    positions past a session's new length become 0 (catalogue eviction)."""
    m = len(remap)
    width = items.shape[1]
    for s in range(items.shape[0]):
        out = 0
        for j in range(lengths[s]):
            it = items[s, j]
            if it < m:
                new = remap[it]
                if new >= 0:
                    items[s, out] = new
                    out += 1
        for j in range(out, width):
            items[s, j] = 0
        lengths[s] = out


@_jit
def _compact(p_start, p_size, p_cap, arena, n_rows, out):  # type: ignore[no-untyped-def]
    used = 0
    for r in range(n_rows):
        c = p_cap[r]
        if c == 0:
            continue
        s = p_start[r]
        for i in range(p_size[r]):
            out[used + i] = arena[s + i]
        p_start[r] = used
        used += c
    return used


class SessionKNN(VocabularyModel):
    """Streaming V-STAN-style session-kNN (see the module docstring for the formula).

    >>> m = SessionKNN(k=10)
    >>> for i, t in enumerate(["a", "b", "c"]):
    ...     m.learn_one(Interaction("u", t, i, session_position=i))
    >>> {t: round(v, 3) for t, v in m.candidates(Interaction("v", history=("a",)), 5).items()}
    {'b': 0.35, 'c': 0.212}
    """

    def __init__(
        self,
        k: int = 100,
        sample: int = 500,
        max_sessions: int = 50_000,
        session_length: int = 50,
        query_window: int = 10,
        lambda_position: float | None = 2.0,
        lambda_recency_ms: float | None = 7 * 24 * 3600 * 1000,
        lambda_distance: float | None = 2.0,
        vocabulary: Vocabulary | None = None,
        seed: int = 0,
    ) -> None:
        for name, value in (("k", k), ("sample", sample), ("max_sessions", max_sessions),
                            ("session_length", session_length), ("query_window", query_window)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if query_window > MAX_QUERY_WINDOW:
            raise ValueError(f"query_window must be <= {MAX_QUERY_WINDOW}, got {query_window}")
        for name, lam in (("lambda_position", lambda_position),
                          ("lambda_recency_ms", lambda_recency_ms),
                          ("lambda_distance", lambda_distance)):
            if lam is not None:
                check_positive(name, lam)
        self.k = k
        self.sample = sample
        self.max_sessions = max_sessions
        self.session_length = session_length
        self.query_window = query_window
        self.lambda_position = lambda_position
        self.lambda_recency_ms = lambda_recency_ms
        self.lambda_distance = lambda_distance
        self.vocabulary = vocabulary
        self.seed = seed
        self._vocab = vocabulary if vocabulary is not None else Vocabulary()
        self._serials: IntArray = np.full(max_sessions, -1, dtype=np.int64)
        self._items: Int32Array = np.zeros((max_sessions, session_length), dtype=np.int32)
        self._lengths: Int32Array = np.zeros(max_sessions, dtype=np.int32)
        self._times: IntArray = np.zeros(max_sessions, dtype=np.int64)
        self._owner: list[str | None] = [None] * max_sessions
        self._open: dict[str, int] = {}  # listener -> serial of their open session
        self._next_serial = 0
        self._p_start: IntArray = np.zeros(0, dtype=np.int64)
        self._p_size: IntArray = np.zeros(0, dtype=np.int64)
        self._p_cap: IntArray = np.zeros(0, dtype=np.int64)
        self._p_head: IntArray = np.zeros(0, dtype=np.int64)
        self._arena: IntArray = np.zeros(1024, dtype=np.int64)
        self._used = 0
        self._scratch: dict[str, Any] = {}

    # -- learning -------------------------------------------------------------------------

    def learn_one(self, x: Interaction) -> None:
        """Add ``x.track_id`` to the listener's open session (a new one when
        ``x.session_position == 0`` or none is open)."""
        self.learn_play(x.user_id, x.track_id, x.ts_ms, x.session_position)

    def learn_play(self, user_id: str, track_id: str, ts_ms: int, position: int) -> None:
        """:meth:`learn_one` from the fields it reads (``user_id`` is the session's key:
        the recommender passes its session token), without building an Interaction."""
        row = self._vocab.add(track_id)
        serial = self._open.get(user_id)
        n = self.max_sessions
        if (serial is None or position == 0
                or self._serials[serial % n] != serial):
            serial = self._new_session(user_id)
        self._ensure_rows(len(self._vocab))
        if self._used + 2 * self.sample > len(self._arena):
            self._make_room()
        self._used = int(stan_learn(
            self._items, self._lengths, self._times, serial % n, row, ts_ms,
            self._p_start, self._p_size, self._p_cap, self._p_head, self._arena,
            self._used, serial, self.sample,
        ))

    def _new_session(self, user_id: str) -> int:
        serial = self._next_serial
        self._next_serial += 1
        slot = serial % self.max_sessions
        old = self._owner[slot]
        if old is not None and self._open.get(old) == int(self._serials[slot]):
            del self._open[old]
        self._serials[slot] = serial
        self._lengths[slot] = 0
        self._owner[slot] = user_id
        self._open[user_id] = serial
        return serial

    def _ensure_rows(self, n: int) -> None:
        if n > len(self._p_start):
            self._p_start = grow_rows(self._p_start, n)
            self._p_size = grow_rows(self._p_size, n)
            self._p_cap = grow_rows(self._p_cap, n)
            self._p_head = grow_rows(self._p_head, n)

    def _make_room(self) -> None:
        live = int(self._p_cap.sum())
        length = len(self._arena)
        if live + 2 * self.sample > length // 2:
            length = max(2 * length, 2 * (live + 2 * self.sample))
        out = np.zeros(length, dtype=np.int64)
        self._used = int(_compact(self._p_start, self._p_size, self._p_cap, self._arena,
                                  len(self._p_start), out))
        self._arena = out

    # -- scoring --------------------------------------------------------------------------

    def score(
        self, history: Sequence[str], user_id: str, now_ms: int, *, plain: bool = False
    ) -> tuple[IntArray, FloatArray]:
        """Vocabulary rows with a score > 0 for the query session ``history`` (oldest
        first; its last ``query_window`` tracks are used), and their scores. ``plain``: all
        three weights off (SKNN)."""
        get = self._vocab.index.get
        rows: list[int] = []
        for t in history[-self.query_window:]:
            r = get(t)
            if r is not None and r < len(self._p_start) and r not in rows:
                rows.append(r)
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        nq = len(rows)
        lam1 = None if plain else self.lambda_position
        q_w = self._position_weights(nq, lam1)
        lam2 = None if plain else self.lambda_recency_ms
        lam3 = None if plain else self.lambda_distance
        serial = self._open.get(user_id, -1)
        size = len(self._vocab)
        qmark, slot_mark, acc, touched = self._buffers(size)
        q = np.array(rows, dtype=np.int64)
        try:
            nt = int(stan_query(
                q, q_w, self._serials, self._items, self._lengths, self._times,
                self._p_start, self._p_size, self._arena, now_ms, serial, self.k,
                0.0 if lam2 is None else 1.0 / lam2, 0.0 if lam3 is None else 1.0 / lam3,
                qmark, slot_mark, acc, touched,
            ))
        except BaseException:
            qmark[:] = -1
            slot_mark[:] = False
            acc[:] = 0.0
            raise
        out_rows = touched[:nt].copy()
        out_scores = acc[out_rows]
        acc[out_rows] = 0.0
        return out_rows, out_scores

    def query_inputs(self, user_id: str, now_ms: int, longest: int | None = None
                     ) -> tuple[Any, ...]:
        """What :func:`stan_query` reads besides the query rows, their weights and the
        time, for a caller that runs the (non-plain) query inside its own compiled call
        (the learned blend's :func:`~stream.core.models._blend_kernels.blend_collect`):
        :meth:`position_table` (for queries of up to ``longest`` tracks), the sessions, the
        postings, the time, the listener's open session, ``k``, 1/λ2, 1/λ3 and the scratch
        (see :meth:`clear_scratch`)."""
        lam2, lam3 = self.lambda_recency_ms, self.lambda_distance
        qmark, slot_mark, acc, touched = self._buffers(len(self._vocab))
        return (self.position_table(longest), self._serials, self._items, self._lengths,
                self._times, self._p_start, self._p_size, self._arena, now_ms,
                self._open.get(user_id, -1), self.k,
                0.0 if lam2 is None else 1.0 / lam2, 0.0 if lam3 is None else 1.0 / lam3,
                qmark, slot_mark, acc, touched)

    def position_table(self, longest: int | None = None) -> FloatArray:
        """Row ``l - 1`` holds STAN's position weights of an ``l``-track query (the
        arrays :meth:`score` uses, copied: the same floats), ``l`` up to at least
        ``min(longest, query_window)`` (``None``: ``query_window``). Built on demand and
        grown by doubling (up to ``query_window``): it holds the square of the longest
        query asked for, not of ``query_window`` (a query is the listener's recent plays)."""
        top = self.query_window
        need = top if longest is None else min(max(longest, 1), top)
        lam1 = self.lambda_position
        cache = self.__dict__.setdefault("_q_table", {})
        table: FloatArray | None = cache.get((top, lam1))
        if table is None or len(table) < need:
            w = need if table is None else min(max(need, 2 * len(table)), top)
            table = np.zeros((w, w))
            for nq in range(1, w + 1):
                table[nq - 1, :nq] = self._position_weights(nq, lam1)
            cache[top, lam1] = table
        return table

    def clear_scratch(self) -> None:
        """Reset the query scratch (after a query that raised part way)."""
        sc = self._scratch
        if "qmark" in sc:
            sc["qmark"][:] = -1
            sc["acc"][:] = 0.0
        if "slot_mark" in sc:
            sc["slot_mark"][:] = False

    def _position_weights(self, nq: int, lam1: float | None) -> FloatArray:
        """STAN's position weights of a ``nq``-track query (cached: the kernel only reads)."""
        cache = self.__dict__.setdefault("_q_w", {})
        q_w: FloatArray | None = cache.get((nq, lam1))
        if q_w is None:
            q_w = np.ones(nq) if lam1 is None else np.exp((np.arange(1, nq + 1) - nq) / lam1)
            cache[nq, lam1] = q_w
        return q_w

    def _buffers(self, size: int) -> tuple[IntArray, Any, FloatArray, IntArray]:
        sc = self._scratch
        if sc.get("size", -1) < size:
            cap = max(size, 2 * sc.get("size", 0), 64)
            sc["size"] = cap
            sc["qmark"] = np.full(cap, -1, dtype=np.int64)
            sc["acc"] = np.zeros(cap)
            sc["touched"] = np.zeros(cap, dtype=np.int64)
        if "slot_mark" not in sc:
            sc["slot_mark"] = np.zeros(self.max_sessions, dtype=np.bool_)
        return sc["qmark"], sc["slot_mark"], sc["acc"], sc["touched"]

    def predict_one(self, x: Interaction) -> float:
        """STAN score of ``x.track_id`` after the session ``x.history``."""
        row = self._vocab.index.get(x.track_id)
        if row is None:
            return 0.0
        rows, scores = self.score(x.history, x.user_id, x.ts_ms)
        hit = np.flatnonzero(rows == row)
        return float(scores[hit[0]]) if len(hit) else 0.0

    def score_many(self, x: Interaction, track_ids: Sequence[str]) -> FloatArray:
        rows, scores = self.score(x.history, x.user_id, x.ts_ms)
        by_row = dict(zip(rows.tolist(), scores.tolist(), strict=True))
        get = self._vocab.index.get
        return np.array([by_row.get(get(t, -1), 0.0) for t in track_ids], dtype=np.float64)

    def candidates(
        self, x: Interaction, n: int, exclude: Sequence[str] | frozenset[str] = frozenset()
    ) -> dict[str, float]:
        """Up to ``n`` tracks of the nearest sessions, best first (ties: lower row)."""
        rows, scores = self.score(x.history, x.user_id, x.ts_ms)
        ids = self._vocab.ids
        order = np.lexsort((rows, -scores))
        out: dict[str, float] = {}
        for i in order.tolist():
            t = ids[int(rows[i])]
            if t in exclude:
                continue
            out[t] = float(scores[i])
            if len(out) >= n:
                break
        return out

    # -- catalogue, privacy, memory ---------------------------------------------------------

    def evict_rows(self, plan: EvictionPlan) -> None:
        """Apply a catalogue eviction (see :class:`~stream.core.models._vocab.EvictionPlan`;
        called before the vocabulary applies it): sessions lose evicted tracks and renumber
        the rest, the movers' session rings move into the holes, evicted rings go (the
        arena is compacted)."""
        drain(self.evict_steps(plan))

    def evict_steps(self, plan: EvictionPlan) -> EvictionSteps[None]:
        """:meth:`evict_rows` in steps (:data:`~stream.core.models._vocab.EvictionSteps`):
        the sessions' renumbering (``max_sessions x session_length`` entries: 0.2-0.6 s of
        numpy work that held the GIL at the defaults) and the arena's compaction are
        compiled passes that release the GIL."""
        keep = plan.keep
        for name in ("_items", "_lengths"):  # renumbered in place
            arr = getattr(self, name)
            if not (arr.flags.c_contiguous and arr.flags.writeable):
                setattr(self, name, arr.copy(order="C"))
        yield partial(_renumber_sessions, self._items, self._lengths, plan.remap)
        self._ensure_rows(len(plan.remap))
        yield None
        n = len(plan.remap)
        for arr in (self._p_start, self._p_size, self._p_cap, self._p_head):
            arr[plan.holes] = arr[plan.movers]
            # rows from keep on become empty rings, and keep their memory: truncating them
            # made the next eviction grow (allocate and copy) all four again, ~0.1 s on the
            # event loop at 500k tracks on a loaded machine
            arr[keep:n] = 0
            yield None
        live = int(self._p_cap.sum())
        length = len(self._arena)
        if live + 2 * self.sample > length // 2:
            length = max(2 * length, 2 * (live + 2 * self.sample))
        out = np.zeros(length, dtype=np.int64)
        yield partial(self._compact_into, out)

    def _compact_into(self, out: IntArray) -> None:
        """Compact the arena into ``out`` (a compiled pass) and keep ``out``."""
        self._used = int(_compact(self._p_start, self._p_size, self._p_cap, self._arena,
                                  len(self._p_start), out))
        self._arena = out

    def forget_user(self, user_id: str) -> bool:
        """Drop the link from a listener to their open session (sessions hold no ids)."""
        serial = self._open.pop(user_id, None)
        for slot, owner in enumerate(self._owner):
            if owner == user_id:
                self._owner[slot] = None
        return serial is not None

    def memory_bytes(self) -> int:
        arrays = (self._serials, self._items, self._lengths, self._times, self._p_start,
                  self._p_size, self._p_cap, self._p_head, self._arena)
        return sum(a.nbytes for a in arrays)

    def open_users(self) -> list[str]:
        """The listeners linked to their open session (the only listener ids held)."""
        return list(self._open)

    # -- state ----------------------------------------------------------------------------

    _PARAMS: dict[str, Any] = {
        "k": int, "sample": int, "max_sessions": int, "session_length": int,
        "query_window": int, "lambda_position": (float, type(None)),
        "lambda_recency_ms": (float, type(None)), "lambda_distance": (float, type(None)),
        "seed": int,
    }
    _WHERE = "session_knn"

    def _export_fields(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The session table (track rows, lengths, last-play times, serials, owners) and
        each track's ring of recent sessions, compacted."""
        n = min(len(self._p_start), len(self._vocab))
        p_start = self._p_start[:n].copy()
        p_size, p_cap = self._p_size[:n].copy(), self._p_cap[:n].copy()
        arena = np.zeros(int(p_cap.sum()), dtype=np.int64)
        used = int(_compact(p_start, p_size, p_cap, self._arena, n, arena))
        # only the live sessions (the table is max_sessions x session_length, mostly empty
        # early on): their slots, then their tracks concatenated
        slots = np.flatnonzero(self._serials >= 0).astype(np.int64)
        lengths = self._lengths[slots].astype(np.int64)
        width = self.session_length
        items = self._items[slots][np.arange(width)[None, :] < lengths[:, None]]
        o_blob, o_ends = encode_strings([self._owner[i] or "" for i in slots.tolist()])
        fields: dict[str, Any] = {
            "next_serial": self._next_serial,
            "open": dict(self._open),
        }
        arrays: dict[str, np.ndarray] = {
            "slots": slots, "serials": self._serials[slots].astype(np.int64),
            "lengths": lengths, "items": items.astype(np.int32),
            "times": self._times[slots].astype(np.int64),
            "p_start": p_start, "p_size": p_size, "p_cap": p_cap,
            "p_head": self._p_head[:n].copy(), "arena": arena[:used],
            "owners.bytes": o_blob, "owners.ends": o_ends,
        }
        return fields, arrays

    def _import_fields(
        self, manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray], where: str
    ) -> None:
        """Rows, serials and ring slices feed compiled kernels unchecked: all are checked."""
        array = partial(get_array, arrays, where=where)
        size = len(self._vocab)
        s, width = self.max_sessions, self.session_length
        next_serial = get_field(manifest, "next_serial", int, where=where, lo=0)
        slots = array("slots", np.int64, ndim=1, lo=0, hi=s - 1)
        m = len(slots)
        if m and bool(np.any(np.diff(slots) <= 0)):
            raise ValueError(f"{where}.slots: not strictly ascending")
        live_serials = array("serials", np.int64, shape=(m,), lo=0,
                             hi=max(next_serial - 1, 0))
        if bool(np.any(live_serials % s != slots)):
            raise ValueError(f"{where}.serials: a session in the wrong slot")
        live_lengths = array("lengths", np.int64, shape=(m,), lo=0, hi=width)
        total = int(live_lengths.sum())
        live_items = array("items", np.int32, shape=(total,), lo=0, hi=max(size - 1, 0))
        if total and size == 0:
            raise ValueError(f"{where}.items: sessions hold tracks, the vocabulary is empty")
        live_times = array("times", np.int64, shape=(m,), lo=0, hi=INT_LIMIT)
        serials = np.full(s, -1, dtype=np.int64)
        serials[slots] = live_serials
        lengths = np.zeros(s, dtype=np.int32)
        lengths[slots] = live_lengths
        items = np.zeros((s, width), dtype=np.int32)
        items[np.repeat(slots, live_lengths),
              np.arange(total) - np.repeat(np.cumsum(live_lengths) - live_lengths,
                                           live_lengths)] = live_items
        times = np.zeros(s, dtype=np.int64)
        times[slots] = live_times
        arena = array("arena", np.int64, ndim=1, lo=0, hi=max(next_serial - 1, 0))
        p_start = array("p_start", np.int64, ndim=1, lo=0, hi=len(arena))
        n = len(p_start)
        if n > size:
            raise ValueError(f"{where}.p_start: {n} rows, the vocabulary has {size}")
        p_cap = array("p_cap", np.int64, shape=(n,), lo=0, hi=self.sample)
        p_size = array("p_size", np.int64, shape=(n,), lo=0, hi=self.sample)
        p_head = array("p_head", np.int64, shape=(n,), lo=0, hi=max(self.sample - 1, 0))
        if bool(np.any(p_size > p_cap)) or bool(np.any((p_cap > 0) & (p_head >= p_cap))) \
                or bool(np.any((p_cap == 0) & (p_head > 0))):
            raise ValueError(f"{where}.p_size/p_head: outside their ring's p_cap")
        if bool(np.any(p_start + p_cap > len(arena))):
            raise ValueError(f"{where}.p_start: a ring runs past the arena")
        owners = decode_strings(f"{where}.owners", *(
            array(f"owners.{part}", dtype) for part, dtype in (("bytes", np.uint8),
                                                              ("ends", np.int64))))
        if len(owners) != m:
            raise ValueError(f"{where}.owners: {len(owners)} entries for {m} sessions")
        opened = get_field(manifest, "open", dict, where=where)
        for user, serial in opened.items():
            if len(user) > ID_LEN:
                raise ValueError(f"{where}.open: a listener id longer than {ID_LEN}")
            if not isinstance(serial, int) or isinstance(serial, bool) \
                    or not 0 <= serial < next_serial:
                raise ValueError(f"{where}.open.{user[:64]}: expects a session serial")
        self._serials, self._lengths, self._items = serials, lengths, items
        self._times = times
        self._p_start, self._p_size = p_start.copy(), p_size.copy()
        self._p_cap, self._p_head = p_cap.copy(), p_head.copy()
        self._ensure_rows(size)
        self._arena = np.concatenate((arena, np.zeros(max(1024, len(arena)), dtype=np.int64)))
        self._used = len(arena)
        self._next_serial = next_serial
        self._owner = [None] * s
        for slot, owner in zip(slots.tolist(), owners, strict=True):
            self._owner[slot] = owner or None
        self._open = dict(opened)
