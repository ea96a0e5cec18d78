"""Compiled ranking of one session model alone: the evaluation variants ``sknn``, ``stan``
and ``sr`` (``Recommender._session_ranking``), one call per list instead of ~15 numpy calls.

The list (the reference is ``Recommender._rank_session_reference``): the model's tracks
with a positive score that are not banned, at most ``room`` of them (the best), then the
``room`` most played tracks not banned and not already in (trending's kept top set), ordered
by the model's score scaled to its maximum plus 1e-6 times the popularity scaled the same
way, ties by row.

Ties: numpy's ``argpartition`` picks the best ``room`` in the reference, and which of
several tracks tied at the cut it keeps depends on the CPU (its SIMD selection on AVX-512
machines keeps others than on AVX2 or baseline ones). Where no tie straddles the cut every
selection keeps the same set and the kernel selects; where one does, the kernel stops and
says so (:data:`NEED_MODEL_CUT`, :data:`NEED_FILL`), and the caller makes numpy's choice
and finishes with :func:`session_order`, so the lists stay exactly the reference's.
"""

from __future__ import annotations

import math
from typing import Any, Final

import numba
import numpy as np

from stream.core.models._kernels import (
    _top_n,
    among,
    cooc_accumulate,
    query_anchors,
    reset_touched,
)
from stream.core.models.stan import best_order, candidate_sessions, stan_query, vote

_jit: Any = numba.njit(cache=True, nogil=True)

#: :func:`rank_stan` / :func:`rank_sr` status, bit flags: ranked (DONE); the model's rows
#: need numpy's cut of the best ``room`` (ties at it); the trending fill needs ``top_set``
#: (ties at its cut, or its kept top set runs short); both (``NEED_MODEL_CUT | NEED_FILL``)
DONE: Final = 0
NEED_MODEL_CUT: Final = 1
NEED_FILL: Final = 2


@_jit
def best_set(vals, n):  # type: ignore[no-untyped-def]
    """Indices of the ``n`` highest ``vals`` (all of them if fewer), and whether a tie at
    the cut makes that set one choice among several (then another selection, numpy's
    ``argpartition``, may keep other tied entries)."""
    m = len(vals)
    if m <= n:
        return np.arange(m), False
    idx = _top_n(np.arange(m), vals, n)
    cut = vals[idx[0]]
    for i in idx:
        if vals[i] < cut:
            cut = vals[i]
    above_or_at = 0
    for v in vals:
        if v >= cut:
            above_or_at += 1
    return idx, above_or_at > n


@_jit
def session_order(rows, vals, fill, pop_w, pop_div):  # type: ignore[no-untyped-def]
    """The ranked list of the model's ``rows`` (scores ``vals``) and the trending ``fill``
    (those of it not in ``rows``): rows, scores and whether each came from the model.
    ``pop_div``: the popularity divisor (its total weight, 1 while 0)."""
    n_model = len(rows)
    extra = np.empty(len(fill), dtype=np.int64)
    m = 0
    for r in fill:
        if not among(rows, n_model, r):
            extra[m] = r
            m += 1
    c = n_model + m
    all_rows = np.empty(c, dtype=np.int64)
    all_rows[:n_model] = rows
    all_rows[n_model:] = extra[:m]
    scores = np.zeros(c)
    hi = vals.max() if n_model else 0.0
    if hi > 0:
        for i in range(n_model):
            scores[i] = vals[i] / hi
    pop = np.empty(c)
    for i in range(c):
        pop[i] = pop_w[all_rows[i]] / pop_div
    hi = pop.max() if c else 0.0
    if hi > 0:
        for i in range(c):
            scores[i] += 1e-6 * (pop[i] / hi)
    by_row = np.argsort(all_rows)  # distinct rows: then a stable sort by score
    order = by_row[np.argsort(-scores[by_row], kind="mergesort")]
    from_model = order < n_model
    return all_rows[order], scores[order], from_model


@_jit
def _trending_fill(pop_members, pop_w, ban, size, room):  # type: ignore[no-untyped-def]
    """``DecayedPopularity.top_set(room, ban)`` where it is one set (the kept top set has
    more than ``room`` allowed tracks and no tie at the cut, or exactly ``room``, or it
    is the whole catalogue); else ok=False."""
    members = np.empty(len(pop_members), dtype=np.int64)
    n_members = 0
    allowed = np.empty(len(pop_members), dtype=np.int64)
    m = 0
    for r in pop_members:
        if r < len(ban):
            members[n_members] = r
            n_members += 1
            if not ban[r]:
                allowed[m] = r
                m += 1
    allowed = allowed[:m]
    if m > room:
        w = np.empty(m)
        for i in range(m):
            w[i] = pop_w[allowed[i]]
        idx, ambiguous = best_set(w, room)
        return allowed[idx], not ambiguous
    return allowed, m == room or n_members >= size


@_jit
def _finish(rows, vals, ban, room, pop_members, pop_w, pop_div, size):  # type: ignore[no-untyped-def]
    """:func:`finish_with` trending's fill (:func:`_trending_fill`, ``ban`` set)."""
    fill, ok = _trending_fill(pop_members, pop_w, ban, size, room)
    return finish_with(rows, vals, ban, room, fill, ok, pop_w, pop_div)


@_jit
def finish_with(rows, vals, ban, room, fill, fill_ok, pop_w, pop_div):  # type: ignore[no-untyped-def]
    """Filter, cut and fill the model's ``rows``/``vals`` (``ban`` set; ``fill``, ``fill_ok``:
    :func:`_trending_fill` of these bans and ``room``), and rank: status, the ranked rows,
    scores, model flags and the fill (status DONE), or the rows and values the caller goes
    on from (the filtered ones with NEED_MODEL_CUT, else the cut), no flags, and the fill
    unless NEED_FILL."""
    keep_rows = np.empty(len(rows), dtype=np.int64)
    keep_vals = np.empty(len(rows))
    m = 0
    for i in range(len(rows)):
        if vals[i] > 0 and not ban[rows[i]]:
            keep_rows[m] = rows[i]
            keep_vals[m] = vals[i]
            m += 1
    keep_rows, keep_vals = keep_rows[:m], keep_vals[:m]
    status = DONE
    if m > room:
        idx, ambiguous = best_set(keep_vals, room)
        if ambiguous:
            status |= NEED_MODEL_CUT
        else:
            keep_rows, keep_vals = keep_rows[idx], keep_vals[idx]
    if not fill_ok:
        status |= NEED_FILL
    if status != DONE:
        return status, keep_rows, keep_vals, np.zeros(0, dtype=np.bool_), fill
    ranked, scores, from_model = session_order(keep_rows, keep_vals, fill, pop_w, pop_div)
    return DONE, ranked, scores, from_model, fill


@_jit
def _ban(ban, rows, flag):  # type: ignore[no-untyped-def]
    """``ban[r] = flag`` for the ``rows`` inside ``ban`` (numba does not bounds-check)."""
    nb = len(ban)
    for r in rows:
        if 0 <= r < nb:
            ban[r] = flag


@_jit
def _query_rows(recent, n_query, n_indexed):  # type: ignore[no-untyped-def]
    """STAN's query: the last ``n_query`` of the ``recent`` rows (oldest first, -1
    unknown), the known, indexed (below ``n_indexed``) and distinct ones."""
    q = np.empty(n_query, dtype=np.int64)
    nq = 0
    for i in range(len(recent) - n_query, len(recent)):
        r = recent[i]
        if 0 <= r < n_indexed and not among(q, nq, r):
            q[nq] = r
            nq += 1
    return q[:nq]


@_jit
def stan_pair_query(q_rows, q_w, serials, items, lengths, times, p_start, p_size, arena,  # type: ignore[no-untyped-def]
                    now, own, k, inv_l2, inv_l3, qmark, slot_mark, acc, touched, acc2,
                    touched2):
    """:func:`stan_query` of ``q_rows`` twice, from one pass over the neighbour sessions:
    with STAN's weights (``q_w``, 1/λ2, 1/λ3) into ``acc``/``touched`` and plain (SKNN:
    every weight 1) into ``acc2``/``touched2`` -- the candidate sessions, their matches
    and the arithmetic of each are :func:`stan_query`'s. Returns both touched counts.

    The plain query's decays are ``exp(-x * 0.0)``, exactly 1.0 (``age`` is an integer, so
    ``x`` is finite), and ``v * 1.0`` is ``v``: its similarity is ``num2 / norm`` and its
    vote weight 1.0 without computing either exponential (one per candidate session)."""
    nq = q_rows.shape[0]
    cand = candidate_sessions(q_rows, serials, p_start, p_size, arena, own, qmark, slot_mark)
    nc = len(cand)
    sims = np.zeros(nc)
    sims2 = np.zeros(nc)
    match = np.zeros(nc, dtype=np.int64)
    for c in range(nc):
        slot = cand[c]
        slot_mark[slot] = False
        num = 0.0
        num2 = 0.0
        best_q = -1
        best_p = 0
        ln = lengths[slot]
        for p in range(ln):
            qi = qmark[items[slot, p]]
            if qi >= 0:
                num += q_w[qi]
                num2 += 1.0
                if qi > best_q:
                    best_q = qi
                    best_p = p
        if best_q < 0 or ln == 0:
            continue
        age = now - times[slot]
        if age < 0:
            age = 0
        norm = math.sqrt(nq * ln)
        sims[c] = num / norm * math.exp(-age * inv_l2)
        sims2[c] = num2 / norm
        match[c] = best_p
    width = items.shape[1]
    by_distance = np.empty(width + 1)
    for d in range(width + 1):
        by_distance[d] = math.exp(-d * inv_l3)
    flat = np.ones(width + 1)
    nt = vote(best_order(sims, k), sims, cand, match, items, lengths, by_distance, qmark,
               acc, touched)
    nt2 = vote(best_order(sims2, k), sims2, cand, match, items, lengths, flat, qmark,
                acc2, touched2)
    for qi in range(nq):
        qmark[q_rows[qi]] = -1
    return nt, nt2


@_jit
def _take(acc, touched, nt):  # type: ignore[no-untyped-def]
    """The touched rows and their scores, ``acc`` zeroed behind them."""
    rows = touched[:nt].copy()
    vals = np.empty(nt)
    for i in range(nt):
        vals[i] = acc[rows[i]]
        acc[rows[i]] = 0.0
    return rows, vals


@_jit
def knn_scores(  # type: ignore[no-untyped-def]
    recent, n_query, which, table, serials, items, lengths, times, p_start, p_size, arena,
    now, own, k, inv_l2, inv_l3, qmark, slot_mark, acc, touched, acc2, touched2,
):
    """STAN and/or plain SKNN (every weight 1) queried with the last ``n_query`` of the
    ``recent`` rows (:func:`_query_rows`): ``which`` 0 STAN, 1 SKNN, 2 both from one pass
    (:func:`stan_pair_query`). Returns STAN's touched rows and scores, then SKNN's (empty
    for the one not asked for); the scratch is left clean. ValueError if ``table`` (the
    position weights, ``SessionKNN.position_table``) is shorter than the query."""
    q = _query_rows(recent, n_query, len(p_start))
    nq = len(q)
    rows = rows2 = np.empty(0, dtype=np.int64)
    vals = vals2 = np.empty(0)
    if nq > len(table):  # built for shorter queries: reading past it would be garbage
        raise ValueError("knn_scores: the position table is shorter than the query")
    if nq and which == 2:
        nt, nt2 = stan_pair_query(q, table[nq - 1, :nq], serials, items, lengths, times,
                                  p_start, p_size, arena, now, own, k, inv_l2, inv_l3,
                                  qmark, slot_mark, acc, touched, acc2, touched2)
        rows, vals = _take(acc, touched, nt)
        rows2, vals2 = _take(acc2, touched2, nt2)
    elif nq:
        plain = which == 1
        q_w = np.ones(nq) if plain else table[nq - 1, :nq].copy()
        nt = stan_query(q, q_w, serials, items, lengths, times, p_start, p_size, arena,
                        now, own, k, 0.0 if plain else inv_l2, 0.0 if plain else inv_l3,
                        qmark, slot_mark, acc, touched)
        if plain:
            rows2, vals2 = _take(acc, touched, nt)
        else:
            rows, vals = _take(acc, touched, nt)
    return rows, vals, rows2, vals2


@_jit
def rank_stan(  # type: ignore[no-untyped-def]
    recent, n_query, which, table, serials, items, lengths, times, p_start, p_size, arena,
    now, own, k, inv_l2, inv_l3, qmark, slot_mark, acc, touched, acc2, touched2,
    ban, ban_rows, room, pop_members, pop_w, pop_div, size,
):
    """:func:`knn_scores` (``which``: 0 STAN, 1 SKNN, 2 both), then :func:`finish_with` of
    each with ``ban_rows`` banned (one trending fill for both). Returns STAN's outcome and
    SKNN's (an empty DONE for the one not asked for). Leaves the scratch and ``ban`` as
    found."""
    rows, vals, rows2, vals2 = knn_scores(
        recent, n_query, which, table, serials, items, lengths, times, p_start, p_size,
        arena, now, own, k, inv_l2, inv_l3, qmark, slot_mark, acc, touched, acc2, touched2)
    out = out2 = no_outcome()
    _ban(ban, ban_rows, True)
    fill, ok = _trending_fill(pop_members, pop_w, ban, size, room)  # (the same for both)
    if which != 1:
        out = finish_with(rows, vals, ban, room, fill, ok, pop_w, pop_div)
    if which != 0:
        out2 = finish_with(rows2, vals2, ban, room, fill, ok, pop_w, pop_div)
    _ban(ban, ban_rows, False)
    return out, out2


@_jit
def no_outcome():  # type: ignore[no-untyped-def]
    """The outcome of a list not asked for: an empty DONE."""
    return (DONE, np.empty(0, dtype=np.int64), np.empty(0), np.zeros(0, dtype=np.bool_),
            np.empty(0, dtype=np.int64))


@_jit
def rank_sr(  # type: ignore[no-untyped-def]
    recent, n_query, decay, start, csize, cap, total, nbr, val, acc, best, anchor, touched,
    ban, ban_rows, room, pop_members, pop_w, pop_div, size,
):
    """The sequential rules (no popularity penalty) queried with the anchors of the last
    ``n_query`` ``recent`` rows (:func:`query_anchors`; they score 0), then
    :func:`_finish` with ``ban_rows`` banned. Leaves the scratch and ``ban`` as found."""
    a_rows, a_weights = query_anchors(recent[len(recent) - n_query:], cap, decay)
    nt = 0
    if len(a_rows):
        nt = cooc_accumulate(start, csize, total, nbr, val, a_rows, a_weights, acc, best,
                             anchor, touched)
        for r in a_rows:
            acc[r] = 0.0
    rows = touched[:nt].copy()
    vals = np.empty(nt)
    for i in range(nt):
        vals[i] = acc[rows[i]]
    reset_touched(acc, best, anchor, touched, nt)
    _ban(ban, ban_rows, True)
    out = _finish(rows, vals, ban, room, pop_members, pop_w, pop_div, size)
    _ban(ban, ban_rows, False)
    return out

