"""Compiled kernels of the learned blend's ranking (``Recommender._rank_learned``).

Before these, a learned ranking was ~15 small calls from Python (two co-occurrence
queries and one sequential-rules query, each with its anchors built in Python and its
scratch cleared by a context manager, then the candidate gathering, the features and
the reasons), and their set-up cost more than their arithmetic. Here one call gathers the
candidates (:func:`blend_collect`) and one builds the features, scores and order
(:func:`blend_rank`). The arithmetic is the same as the Python path it replaces, operation
for operation, so the lists are identical (docs/benchmarks.md, "Speed pairs (session 13)").
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np

from stream.core.models._kernels import (
    REASON_COOCCURRENCE,
    REASON_MF,
    REASON_POPULARITY,
    _top_n,
    _worse,
    among,
    blend_features,
    component_lists,
    cooc_accumulate,
    desc_order_all,
    heap_push,
    heap_replace_root,
    last_play_scores,
    query_anchors,
    reset_touched,
    unique_rows,
)
from stream.core.models._session_kernels import (
    _trending_fill,
    finish_with,
    knn_scores,
    no_outcome,
)
from stream.core.models.stan import stan_query

_jit: Any = numba.njit(cache=True, nogil=True)

#: reason codes of the sources only the learned blend has (recommender.REASON_ARTIST / _OWN)
REASON_ARTIST = 4
REASON_OWN = 5


@_jit
def _anchors(recent, window, decay, cap):  # type: ignore[no-untyped-def]
    """``SessionCooccurrence.anchors`` on vocabulary rows: the anchors of the last
    ``window`` of ``recent`` (oldest first, -1 = unknown)."""
    m = len(recent)
    return query_anchors(recent[m - window if window < m else 0:], cap, decay)


@_jit
def _query(start, size, total, nbr, val, rows, weights, acc, best, anchor, touched):  # type: ignore[no-untyped-def]
    """``SessionCooccurrence.accumulate`` (no popularity penalty) and what the blend reads
    of it: the touched rows, their scores and their leads; the scratch is left clean."""
    n = cooc_accumulate(start, size, total, nbr, val, rows, weights, acc, best, anchor,
                        touched)
    for r in rows:
        acc[r] = 0.0
    out_rows = touched[:n].copy()
    out_vals = np.empty(n)
    out_lead = np.empty(n, dtype=np.int64)
    for i in range(n):
        out_vals[i] = acc[out_rows[i]]
        out_lead[i] = anchor[out_rows[i]]
    reset_touched(acc, best, anchor, touched, n)
    for r in rows:
        acc[r] = 0.0
    return out_rows, out_vals, out_lead


@_jit
def _prefix(short, long):  # type: ignore[no-untyped-def]
    """Whether ``short`` is the first ``len(short)`` entries of ``long``."""
    if len(short) > len(long):
        return False
    for j in range(len(short)):  # noqa: SIM110 (a loop numba compiles)
        if short[j] != long[j]:
            return False
    return True


@_jit
def _query_pair(start, size, total, nbr, val, s_rows, s_w, l_rows, l_w, pos):  # type: ignore[no-untyped-def]
    """:func:`_query` of the short anchors ``s_rows`` and of the long ones ``l_rows`` in
    one pass over the long anchors' neighbour lists, when ``s_rows`` is a prefix of
    ``l_rows`` (:func:`_anchors` of a shorter window: the same rows, newest first). Every
    sum runs anchor by anchor in the same order as two :func:`_query` calls (the same
    floats); the short query's touched rows are the first ones the pass touches (its
    anchors come first), so its rows come out in the same order too. Scores and leads
    live in compact arrays indexed through ``pos`` (per-row scratch, all -1, left so)
    instead of three dense scratch arrays. Returns the short query's rows, scores and
    leads, then the long one's rows and scores."""
    ns = len(s_rows)
    bound = 0
    for r in l_rows:
        bound += size[r]
    bound = min(bound, len(pos))
    rows = np.empty(bound, dtype=np.int64)
    l_acc = np.empty(bound)
    s_acc = np.empty(bound)
    s_best = np.empty(bound)
    s_lead = np.empty(bound, dtype=np.int64)
    n = 0
    n_short = 0
    for j in range(len(l_rows)):
        r = l_rows[j]
        if total[r] > 0.0:  # (a fully decayed row contributes nothing)
            scale = l_w[j] / total[r]
            short = j < ns
            s_scale = s_w[j] / total[r] if short else 0.0
            st = start[r]
            for p in range(st, st + size[r]):
                d = nbr[p]
                i = pos[d]
                if i < 0:
                    i = n
                    pos[d] = n
                    rows[n] = d
                    l_acc[n] = 0.0
                    s_acc[n] = 0.0
                    s_lead[n] = -1
                    n += 1
                l_acc[i] += val[p] * scale
                if short:
                    c = val[p] * s_scale
                    if s_lead[i] < 0:
                        s_lead[i] = r
                        s_best[i] = c
                    elif c > s_best[i]:
                        s_best[i] = c
                        s_lead[i] = r
                    s_acc[i] += c
        if j < ns:
            n_short = n
    for r in s_rows:  # an anchor never scores itself
        if pos[r] >= 0:
            s_acc[pos[r]] = 0.0
    for r in l_rows:
        if pos[r] >= 0:
            l_acc[pos[r]] = 0.0
    for i in range(n):
        pos[rows[i]] = -1
    return (rows[:n_short], s_acc[:n_short], s_lead[:n_short], rows[:n], l_acc[:n])


@_jit
def stan_source(recent, n_session, window, q_table, serials, items, lengths, times,  # type: ignore[no-untyped-def]
                p_start, p_size, arena, now, own, k, inv_l2, inv_l3, qmark, slot_mark, acc,
                touched):
    """``SessionKNN.score`` of the listener's session, on vocabulary rows: the query is
    the last ``min(n_session, window)`` of ``recent`` (oldest first, -1 = unknown), its
    distinct known rows in order, weighted by row ``l - 1`` of ``q_table``
    (``SessionKNN.position_table(len(recent))``; ValueError if it is shorter); the rest
    are :func:`stan_query`'s arguments. Returns the touched rows and their scores; the
    scratch is left clean."""
    m = len(recent)
    take = min(n_session, window, m)
    q = np.empty(take, dtype=np.int64)
    nq = 0
    for i in range(m - take, m):
        r = recent[i]
        if 0 <= r < len(p_start) and not among(q, nq, r):
            q[nq] = r
            nq += 1
    if nq == 0:
        return np.empty(0, dtype=np.int64), np.empty(0)
    if nq > len(q_table):  # built for shorter queries: reading past it would be garbage
        raise ValueError("stan_source: the position table is shorter than the query")
    nt = stan_query(q[:nq], q_table[nq - 1, :nq], serials, items, lengths, times, p_start,
                    p_size, arena, now, own, k, inv_l2, inv_l3, qmark, slot_mark, acc, touched)
    out_rows = touched[:nt].copy()
    out_vals = np.empty(nt)
    for i in range(nt):
        out_vals[i] = acc[out_rows[i]]
    for i in range(nt):
        acc[out_rows[i]] = 0.0
    return out_rows, out_vals


@_jit
def blend_collect(recent, n_ban, other, pop_members, pop_weights, pop_rows, given, size,  # type: ignore[no-untyped-def]
                  c_start, c_size, c_cap, c_total, c_nbr, c_val, c_window, c_decay, l_window,
                  l_decay, r_start, r_size, r_cap, r_total, r_nbr, r_val, r_window, r_decay,
                  n_session, s_window, s_table, s_serials, s_items, s_lengths, s_times,
                  s_start, s_size, s_arena, now, s_own, s_k, s_inv_l2, s_inv_l3, s_qmark,
                  s_slot_mark, s_acc, s_touched, a_rows, a_vals, o_rows, o_vals, ban, mark, acc,
                  best, anchor, touched, pos, dense, n):
    """The learned blend's candidates in one call (``Recommender._blend_sources``): bans
    the last ``n_ban`` of ``recent`` (vocabulary rows, oldest first, -1 = unknown) and the
    ``other`` rows in ``ban`` (all False, left so), takes trending's top set
    (:func:`pop_top` of ``pop_members`` / ``pop_weights``; ``pop_rows`` instead when
    ``given``), gathers the candidates (:func:`_collect`; the ``c_*`` /
    ``r_*`` / ``s_*`` arguments are its) and the last play's own SR and co-occurrence
    scores of them (:func:`stream.core.models._kernels.last_play_scores`; ``dense``: its
    all-zero scratch). Returns the candidates, their score per source, co-occurrence's
    leads, the last-play scores and True; or four empty arrays and False when the top set
    needs ``DecayedPopularity.top_set`` (a tie at its cut: call again with ``pop_rows``)."""
    _set_bans(recent, n_ban, other, ban, True)
    top = pop_rows
    unique = True
    if not given:
        top, unique = pop_top(pop_members, pop_weights, ban, size, n)
    if not unique:
        _set_bans(recent, n_ban, other, ban, False)
        return (np.empty(0, dtype=np.int64), np.empty((0, 6)), np.empty(0, dtype=np.int64),
                np.empty((0, 2)), False)
    cands, comp, lead = _collect(
        recent, c_start, c_size, c_cap, c_total, c_nbr, c_val, c_window, c_decay, l_window,
        l_decay, r_start, r_size, r_cap, r_total, r_nbr, r_val, r_window, r_decay, n_session,
        s_window, s_table, s_serials, s_items, s_lengths, s_times, s_start, s_size, s_arena,
        now, s_own, s_k, s_inv_l2, s_inv_l3, s_qmark, s_slot_mark, s_acc, s_touched, a_rows,
        a_vals, o_rows, o_vals, top, ban, mark, acc, best, anchor, touched, pos, n)
    _set_bans(recent, n_ban, other, ban, False)
    last = _last_scores(recent, cands, r_start, r_size, r_total, r_nbr, r_val, c_start,
                        c_size, c_total, c_nbr, c_val, dense)
    return cands, comp, lead, last, True


@_jit
def blend_collect_variants(  # type: ignore[no-untyped-def]
    recent, n_ban, other, pop_members, pop_weights, pop_rows, given, size, c_start, c_size,
    c_cap, c_total, c_nbr, c_val, c_window, c_decay, l_window, l_decay, r_start, r_size,
    r_cap, r_total, r_nbr, r_val, r_window, r_decay, n_session, s_window, s_table,
    s_serials, s_items, s_lengths, s_times, s_start, s_size, s_arena, now, s_own, s_k,
    s_inv_l2, s_inv_l3, s_qmark, s_slot_mark, s_acc, s_touched, a_rows, a_vals, o_rows,
    o_vals, ban, mark, acc, best, anchor, touched, pos, dense, n,
    do_stan, do_sknn, do_sr, room, pop_div, acc2, touched2,
    k, n_c, do_pop, do_mf, do_cooc, pick_mf_cooc, do_fixed, n_pop_fixed, use_cooc_fixed,
    use_mf_fixed, pick_mf_fixed, bw_pop, bw_cooc, bw_mf, pop_total, factors, user, has_user,
):
    """:func:`blend_collect` (its arguments first, the same returns first) and, from the
    same queries with the same bans, the other variants' lists (the all-variant replay,
    ``Recommender.component_ids``): STAN's, SKNN's and SR's outcomes
    (``_session_kernels.finish_with``; ``do_sknn``: STAN's pass also scores plain SKNN,
    :func:`knn_scores`, into ``acc2``/``touched2``) and the ranked rows of
    :func:`stream.core.models._kernels.component_lists` (popularity, MF, co-occurrence,
    the fixed blend; its arguments after ``pop_div``) over the co-occurrence query the
    blend ran, packed by :func:`_pack` (``meta``, ``rows``, ``vals``), then trending's
    fill of the three outcomes (one for the three: the same bans and room). Each query
    runs once instead of once for the blend and once per variant; the arguments of each
    are the ones its own call passes (``rank_stan``, ``rank_sr``, ``rank_components``), so
    the lists are the same. The scratch and ``ban`` are left as found; a tie at trending's
    cut returns :func:`blend_collect`'s False and nothing else (an empty ``meta``)."""
    _set_bans(recent, n_ban, other, ban, True)
    top = pop_rows
    unique = True
    if not given:
        top, unique = pop_top(pop_members, pop_weights, ban, size, n)
    empty = np.empty(0, dtype=np.int64)
    stan = sknn = sr = no_outcome()
    fill = empty
    if not unique:
        _set_bans(recent, n_ban, other, ban, False)
        return (empty, np.empty((0, 6)), empty, np.empty((0, 2)), False,
                np.zeros(N_PACKED + 4, dtype=np.int64), empty, np.empty(0), fill)
    s_rows, s_vals, k_rows, k_vals = knn_scores(
        recent, min(n_session, s_window, len(recent)), 2 if do_sknn else 0, s_table,
        s_serials, s_items, s_lengths, s_times, s_start, s_size, s_arena, now, s_own, s_k,
        s_inv_l2, s_inv_l3, s_qmark, s_slot_mark, s_acc, s_touched, acc2, touched2)
    c_rows, c_vals, c_lead, l_rows, l_vals, r_rows, r_vals = _cooc_queries(
        recent, c_start, c_size, c_cap, c_total, c_nbr, c_val, c_window, c_decay, l_window,
        l_decay, r_start, r_size, r_cap, r_total, r_nbr, r_val, r_window, r_decay, acc, best,
        anchor, touched, pos)
    cands, comp, lead = _gather(c_rows, c_vals, c_lead, s_rows, s_vals, r_rows, r_vals,
                                a_rows, a_vals, o_rows, o_vals, l_rows, l_vals, top, ban,
                                mark, pos, n)
    if do_stan or do_sknn or do_sr:  # one trending fill: the same bans and room
        fill, ok = _trending_fill(pop_members, pop_weights, ban, size, room)
        if do_stan:
            stan = finish_with(s_rows, s_vals, ban, room, fill, ok, pop_weights, pop_div)
        if do_sknn:
            sknn = finish_with(k_rows, k_vals, ban, room, fill, ok, pop_weights, pop_div)
        if do_sr:
            sr = finish_with(r_rows, r_vals, ban, room, fill, ok, pop_weights, pop_div)
    nc = len(c_rows)
    for i in range(nc):  # co-occurrence's query back in the dense scratch, for its rankings
        acc[c_rows[i]] = c_vals[i]
        anchor[c_rows[i]] = c_lead[i]
    lists = component_lists(
        size, k, n_c, do_pop, do_mf, do_cooc, pick_mf_cooc, do_fixed, n_pop_fixed,
        use_cooc_fixed, use_mf_fixed, pick_mf_fixed, bw_pop, bw_cooc, bw_mf, pop_members,
        pop_weights, pop_total, acc, anchor, c_rows, factors, user, has_user, ban, mark)
    reset_touched(acc, best, anchor, c_rows, nc)
    _set_bans(recent, n_ban, other, ban, False)
    last = _last_scores(recent, cands, r_start, r_size, r_total, r_nbr, r_val, c_start,
                        c_size, c_total, c_nbr, c_val, dense)
    return (cands, comp, lead, last, True, *_pack(stan, sknn, sr, lists), fill)


#: how many lists :func:`_pack` packs: STAN, SKNN, SR, popularity, MF, co-occurrence, fixed
N_PACKED = 7


@_jit
def _pack(stan, sknn, sr, lists):  # type: ignore[no-untyped-def]
    """The variants' lists in three arrays (each returned array costs the caller a boxing,
    ~1 us): ``meta`` (the offsets of the ``N_PACKED`` lists in ``rows``, then the three
    session outcomes' statuses), ``rows`` (STAN's, SKNN's and SR's outcome rows, then the
    four ranked lists of ``lists``) and ``vals`` (the session outcomes' scores, aligned
    with their rows)."""
    parts = (stan[1], sknn[1], sr[1], lists[0], lists[1], lists[2], lists[3])
    meta = np.empty(N_PACKED + 4, dtype=np.int64)
    meta[0] = 0
    for j in range(N_PACKED):
        meta[j + 1] = meta[j] + len(parts[j])
    meta[N_PACKED + 1] = stan[0]
    meta[N_PACKED + 2] = sknn[0]
    meta[N_PACKED + 3] = sr[0]
    rows = np.empty(meta[N_PACKED], dtype=np.int64)
    for j in range(N_PACKED):
        rows[meta[j]:meta[j + 1]] = parts[j]
    vals = np.empty(meta[3])
    vals[meta[0]:meta[1]] = stan[2]
    vals[meta[1]:meta[2]] = sknn[2]
    vals[meta[2]:meta[3]] = sr[2]
    return meta, rows, vals


@_jit
def _last_scores(recent, cands, r_start, r_size, r_total, r_nbr, r_val, c_start, c_size,  # type: ignore[no-untyped-def]
                 c_total, c_nbr, c_val, dense):
    """The last play's own SR and co-occurrence scores of ``cands`` (columns 0 and 1,
    :func:`stream.core.models._kernels.last_play_scores`; ``dense``: its all-zero scratch)."""
    last = np.empty((len(cands), 2))
    row = recent[len(recent) - 1] if len(recent) else -1
    last_play_scores(r_start, r_size, r_total, r_nbr, r_val, row, cands, dense, last, 0)
    last_play_scores(c_start, c_size, c_total, c_nbr, c_val, row, cands, dense, last, 1)
    return last


@_jit
def _set_bans(recent, n_ban, other, ban, flag):  # type: ignore[no-untyped-def]
    """``ban[r] = flag`` for the known rows of the last ``n_ban`` of ``recent`` and of
    ``other`` (rows outside ``ban``, e.g. a ``SeenTracks`` of another vocabulary, are
    skipped: numba does not bounds-check)."""
    nb = len(ban)
    for i in range(max(len(recent) - n_ban, 0), len(recent)):
        if 0 <= recent[i] < nb:
            ban[recent[i]] = flag
    for r in other:
        if 0 <= r < nb:
            ban[r] = flag


@_jit
def _collect(recent, c_start, c_size, c_cap, c_total, c_nbr, c_val, c_window, c_decay,  # type: ignore[no-untyped-def]
             l_window, l_decay, r_start, r_size, r_cap, r_total, r_nbr, r_val, r_window,
             r_decay, n_session, s_window, s_table, s_serials, s_items, s_lengths, s_times,
             s_start, s_size, s_arena, now, s_own, s_k, s_inv_l2, s_inv_l3, s_qmark,
             s_slot_mark, s_acc, s_touched, a_rows, a_vals, o_rows, o_vals, pop_rows, ban,
             mark, acc, best, anchor, touched, pos, n):
    """The candidates of :func:`blend_collect`: co-occurrence from the last
    ``c_window`` of ``recent``, the long co-occurrence view (``l_window``, 0 = off; both
    in one pass, :func:`_query_pair`, when the short view's anchors are a prefix of the
    long one's), sequential rules from the last ``r_window``, STAN over the session's last
    ``n_session`` (:func:`stan_source`; ``s_*``: ``SessionKNN.query_inputs``), then
    :func:`_gather` (``_kernels.blend_gather``'s picks) over them, the artist and own-history
    sources and trending's ``pop_rows``. ``c_*`` / ``r_*``: the co-occurrence and rules
    arenas (``SessionCooccurrence.arena``, passed array by array: a tuple argument costs
    numba's dispatcher a Python-level type check per call); ``acc``/``best``/``anchor``/
    ``touched`` is co-occurrence's query scratch."""
    s_rows, s_vals = stan_source(recent, n_session, s_window, s_table, s_serials, s_items,
                                 s_lengths, s_times, s_start, s_size, s_arena, now, s_own, s_k,
                                 s_inv_l2, s_inv_l3, s_qmark, s_slot_mark, s_acc, s_touched)
    c_rows, c_vals, c_lead, l_rows, l_vals, r_rows, r_vals = _cooc_queries(
        recent, c_start, c_size, c_cap, c_total, c_nbr, c_val, c_window, c_decay, l_window,
        l_decay, r_start, r_size, r_cap, r_total, r_nbr, r_val, r_window, r_decay, acc, best,
        anchor, touched, pos)
    return _gather(c_rows, c_vals, c_lead, s_rows, s_vals, r_rows, r_vals, a_rows, a_vals,
                   o_rows, o_vals, l_rows, l_vals, pop_rows, ban, mark, pos, n)


@_jit
def _cooc_queries(recent, c_start, c_size, c_cap, c_total, c_nbr, c_val, c_window, c_decay,  # type: ignore[no-untyped-def]
                  l_window, l_decay, r_start, r_size, r_cap, r_total, r_nbr, r_val, r_window,
                  r_decay, acc, best, anchor, touched, pos):
    """:func:`_collect`'s co-occurrence and rules queries: co-occurrence's rows, scores
    and leads, the long view's rows and scores, SR's rows and scores (the scratch is left
    clean)."""
    rows, weights = _anchors(recent, c_window, c_decay, c_cap)
    l_rows = np.empty(0, dtype=np.int64)
    l_vals = np.empty(0)
    long_rows, long_weights = rows, weights
    if l_window > 0:
        long_rows, long_weights = _anchors(recent, l_window, l_decay, c_cap)
    if l_window > 0 and _prefix(rows, long_rows):  # both views in one pass
        c_rows, c_vals, c_lead, l_rows, l_vals = _query_pair(
            c_start, c_size, c_total, c_nbr, c_val, rows, weights, long_rows, long_weights,
            pos)
    else:
        c_rows, c_vals, c_lead = _query(c_start, c_size, c_total, c_nbr, c_val, rows,
                                        weights, acc, best, anchor, touched)
        if l_window > 0:
            l_rows, l_vals, _ = _query(c_start, c_size, c_total, c_nbr, c_val, long_rows,
                                       long_weights, acc, best, anchor, touched)
    rows, weights = _anchors(recent, r_window, r_decay, r_cap)
    r_rows, r_vals, _ = _query(r_start, r_size, r_total, r_nbr, r_val, rows, weights,
                               acc, best, anchor, touched)
    return c_rows, c_vals, c_lead, l_rows, l_vals, r_rows, r_vals


@_jit
def _gather(c_rows, c_vals, c_lead, s_rows, s_vals, r_rows, r_vals, a_rows, a_vals, o_rows,  # type: ignore[no-untyped-def]
            o_vals, l_rows, l_vals, pop_rows, ban, mark, pos, n):
    """:func:`stream.core.models._kernels.blend_gather` of the six sources (co-occurrence,
    STAN, SR, artist, own history, long co-occurrence) as they come, without copying them
    into one array first; each source's ``n`` best through :func:`_top_unbanned`. The
    same candidates, scores and leads (``test_compiled_blend_candidates_match_the_python_
    queries``: the Python path gathers with ``blend_gather``)."""
    picks = np.empty(len(pop_rows) + 6 * n, dtype=np.int64)
    m = len(pop_rows)
    picks[:m] = pop_rows
    m = _top_unbanned(c_rows, c_vals, ban, n, picks, m)
    m = _top_unbanned(s_rows, s_vals, ban, n, picks, m)
    m = _top_unbanned(r_rows, r_vals, ban, n, picks, m)
    m = _top_unbanned(a_rows, a_vals, ban, n, picks, m)
    m = _top_unbanned(o_rows, o_vals, ban, n, picks, m)
    m = _top_unbanned(l_rows, l_vals, ban, n, picks, m)
    cands = unique_rows(picks[:m], mark)
    comp = np.zeros((len(cands), 6))
    lead = np.full(len(cands), -1, dtype=np.int64)
    for i in range(len(cands)):
        pos[cands[i]] = i
    for i in range(len(c_rows)):  # (a later entry of a row wins, as in blend_gather)
        p = pos[c_rows[i]]
        if p >= 0:
            comp[p, 0] = c_vals[i]
            lead[p] = c_lead[i]
    _fill(s_rows, s_vals, pos, comp, 1)
    _fill(r_rows, r_vals, pos, comp, 2)
    _fill(a_rows, a_vals, pos, comp, 3)
    _fill(o_rows, o_vals, pos, comp, 4)
    _fill(l_rows, l_vals, pos, comp, 5)
    for i in range(len(cands)):
        pos[cands[i]] = -1
    return cands, comp, lead


@_jit
def _fill(rows, vals, pos, comp, col):  # type: ignore[no-untyped-def]
    """``comp[pos[r], col] = v`` for each entry (r, v) whose row is a candidate."""
    for i in range(len(rows)):
        p = pos[rows[i]]
        if p >= 0:
            comp[p, col] = vals[i]


@_jit
def _top_unbanned(rows, vals, ban, n, out, m):  # type: ignore[no-untyped-def]
    """Append to ``out`` (from ``m``; returns the new end) the ``n`` best entries with a
    positive score and an unbanned row, as ``blend_gather`` picks them (``_top_n`` of the
    kept entries: ties to the lower row), keeping them in a heap as they come (its root
    the worst kept) instead of copying the kept entries out first."""
    hk = np.empty(n)
    hr = np.empty(n, dtype=np.int64)
    c = 0
    for i in range(len(rows)):
        k = vals[i]
        r = rows[i]
        if not k > 0.0 or ban[r]:
            continue
        if c < n:
            heap_push(hk, hr, c, k, r)
            c += 1
        elif _worse(hk[0], hr[0], k, r):  # better than the worst kept
            heap_replace_root(hk, hr, n, k, r)
    out[m:m + c] = hr[:c]
    return m + c


@_jit
def pop_top(members, weights, ban, size, n):  # type: ignore[no-untyped-def]
    """``DecayedPopularity.top_set(n, ban)`` where the kept top set ``members`` decides it
    and its choice is unique: returns ``(rows, True)`` (in no particular order; ``weights``
    per row, ``size`` the vocabulary's length). ``(empty, False)`` where the Python method
    must decide: the bans leave the kept set short (it scans the catalogue), a tie at the
    cut (numpy's ``argpartition`` picks among the tied rows) or a NaN weight."""
    nb = len(ban)
    allowed = np.empty(len(members), dtype=np.int64)
    key = np.empty(len(members))
    m = 0
    n_members = 0
    for r in members:
        if r < nb:
            n_members += 1
            if not ban[r]:
                allowed[m] = r
                key[m] = weights[r]
                m += 1
    if m > n:
        top = _top_n(allowed[:m], key[:m], n)
        cut = np.inf
        for r in top:
            cut = min(cut, weights[r])
        at_least = 0  # the n heaviest are the only choice if no other row reaches the cut
        for i in range(m):
            if np.isnan(key[i]):
                return np.empty(0, dtype=np.int64), False
            if key[i] >= cut:
                at_least += 1
        if at_least != n:
            return np.empty(0, dtype=np.int64), False
        return top, True
    if m == n or n_members >= size:
        return allowed[:m].copy(), True
    return np.empty(0, dtype=np.int64), False


@_jit
def blend_codes(comp, lead, last):  # type: ignore[no-untyped-def]
    """Reason codes and lead rows of learned-blend candidates (``comp`` columns:
    co-occurrence, STAN, SR, artist, own history): co-occurrence (its lead), else SR (the
    last track led), else STAN, else the artist source, else own history, else
    trending."""
    m = len(lead)
    codes = np.empty(m, dtype=np.int64)
    leads = np.empty(m, dtype=np.int64)
    for i in range(m):
        if comp[i, 0] > 0.0 and lead[i] >= 0:
            codes[i] = REASON_COOCCURRENCE
            leads[i] = lead[i]
        elif comp[i, 2] > 0.0:
            codes[i] = REASON_COOCCURRENCE
            leads[i] = last
        else:
            leads[i] = -1
            if comp[i, 1] > 0.0:
                codes[i] = REASON_MF
            elif comp[i, 3] > 0.0:
                codes[i] = REASON_ARTIST
            elif comp[i, 4] > 0.0:
                codes[i] = REASON_OWN
            else:
                codes[i] = REASON_POPULARITY
    return codes, leads


@_jit
def blend_order(scores, rows, comp, lead, last):  # type: ignore[no-untyped-def]
    """The learned ranking's order and its lists: ``order`` =
    ``np.argsort(-scores, kind="stable")``, then ``rows``, ``scores``, the reason codes and
    their lead rows (:func:`blend_codes`) in that order -- one call for what was an argsort,
    the codes and four gathers."""
    order = desc_order_all(scores)
    codes, leads = blend_codes(comp, lead, last)
    m = len(order)
    o_rows = np.empty(m, dtype=np.int64)
    o_scores = np.empty(m)
    o_codes = np.empty(m, dtype=np.int64)
    o_leads = np.empty(m, dtype=np.int64)
    for j in range(m):
        i = order[j]
        o_rows[j] = rows[i]
        o_scores[j] = scores[i]
        o_codes[j] = codes[i]
        o_leads[j] = leads[i]
    return order, o_rows, o_scores, o_codes, o_leads


@_jit
def blend_matrix(cands, comp, pop_w, pop_total, mf, skip_base, skip_w_pop, skip_w_mf,  # type: ignore[no-untyped-def]
                 same_artist, recent_artist, first_seen, now_ms, hist, w_cooc, w_mf, w_pop, day_ms,
                 last, out):
    """The candidates' popularity (``pop_w[row] / pop_total``), skip probability
    (``SkipClassifier.predict_many``: ``skip_base`` is its intercept plus the listener's
    context terms, ``skip_w_pop`` / ``skip_w_mf`` its weights of the squashed popularity
    and MF scores) and then their feature rows (:func:`blend_features`; ``last``: the
    last play's own SR and co-occurrence scores, :func:`last_play_scores`) into ``out``.
    The skip model's ``log1p``/``tanh``/``exp`` here are libm's, not numpy's vectorised
    ones: the last bit of a probability can differ from ``predict_many``'s (the lists
    were checked on the real logs, docs/benchmarks.md "Speed pairs (session 16)")."""
    m = len(cands)
    pop = np.empty(m)
    skip = np.empty(m)
    for i in range(m):
        p = pop_w[cands[i]] / pop_total
        pop[i] = p
        logit = skip_base
        if skip_w_pop != 0.0:
            logit += skip_w_pop * (math.log1p(1000.0 * max(p, 0.0)) / 7.0)
        if skip_w_mf != 0.0:
            logit += skip_w_mf * math.tanh(mf[i])
        logit = min(max(logit, -30.0), 30.0)
        skip[i] = 1.0 / (1.0 + math.exp(-logit))
    blend_features(cands, comp, pop, mf, skip, same_artist, recent_artist, first_seen, now_ms,
                   hist, w_cooc, w_mf, w_pop, day_ms, last, out)


@_jit
def blend_scores(X, w, eps):  # type: ignore[no-untyped-def]
    """``X @ w + eps * X[:, 0]`` (``LearnedBlend.score``) as a loop: one call, no BLAS
    set-up for a ~80 x 39 product; the sums run feature by feature (BLAS's order differs
    in the last bits)."""
    m, f = X.shape
    out = np.empty(m)
    for i in range(m):
        acc = 0.0
        for j in range(f):
            acc += X[i, j] * w[j]
        out[i] = acc + eps * X[i, 0]
    return out


@_jit
def blend_rank(cands, comp, lead, pop_w, pop_total, mf, skip_base, skip_w_pop, skip_w_mf,  # type: ignore[no-untyped-def]
               same_artist, recent_artist, first_seen, now_ms, hist, w_cooc, w_mf, w_pop,
               day_ms, last, X, w, eps, last_row):
    """The learned ranking after its candidates in one call: the feature rows into ``X``
    (:func:`blend_matrix`), their scores (:func:`blend_scores`, ``LearnedBlend.score``'s
    ``w`` and ``eps``) and the order with its lists (:func:`blend_order`, ``last_row``:
    the last play's row) -- the same three kernels, so the same floats, one dispatch
    instead of three (each unboxed its arrays again)."""
    blend_matrix(cands, comp, pop_w, pop_total, mf, skip_base, skip_w_pop, skip_w_mf,
                 same_artist, recent_artist, first_seen, now_ms, hist, w_cooc, w_mf, w_pop,
                 day_ms, last, X)
    return blend_order(blend_scores(X, w, eps), cands, comp, lead, last_row)
