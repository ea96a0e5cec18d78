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
    among,
    blend_features,
    blend_gather,
    cooc_accumulate,
    desc_order_all,
    query_anchors,
    reset_touched,
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
def blend_collect(recent, c_start, c_size, c_cap, c_total, c_nbr, c_val, c_window, c_decay,  # type: ignore[no-untyped-def]
                  l_window, l_decay, r_start, r_size, r_cap, r_total, r_nbr, r_val, r_window,
                  r_decay, n_session, s_window, s_table, s_serials, s_items, s_lengths, s_times,
                  s_start, s_size, s_arena, now, s_own, s_k, s_inv_l2, s_inv_l3, s_qmark,
                  s_slot_mark, s_acc, s_touched, a_rows, a_vals, o_rows, o_vals, pop_rows, ban,
                  mark, acc, best, anchor, touched, pos, n):
    """The learned blend's candidates in one call: co-occurrence from the last
    ``c_window`` of ``recent`` (vocabulary rows, oldest first, -1 = unknown), the long
    co-occurrence view (``l_window``, 0 = off), sequential rules from the last
    ``r_window``, STAN over the session's last ``n_session`` (:func:`stan_source`; ``s_*``:
    ``SessionKNN.query_inputs``), then :func:`stream.core.models._kernels.blend_gather`
    over them and the artist and own-history sources. ``c_*`` / ``r_*``: the
    co-occurrence and rules arenas (``SessionCooccurrence.arena``, passed array by array:
    a tuple argument costs numba's dispatcher a Python-level type check per call);
    ``acc``/``best``/``anchor``/``touched`` is co-occurrence's query scratch."""
    s_rows, s_vals = stan_source(recent, n_session, s_window, s_table, s_serials, s_items,
                                 s_lengths, s_times, s_start, s_size, s_arena, now, s_own, s_k,
                                 s_inv_l2, s_inv_l3, s_qmark, s_slot_mark, s_acc, s_touched)
    rows, weights = _anchors(recent, c_window, c_decay, c_cap)
    c_rows, c_vals, c_lead = _query(c_start, c_size, c_total, c_nbr, c_val, rows, weights,
                                    acc, best, anchor, touched)
    l_rows = np.empty(0, dtype=np.int64)
    l_vals = np.empty(0)
    if l_window > 0:
        rows, weights = _anchors(recent, l_window, l_decay, c_cap)
        l_rows, l_vals, _ = _query(c_start, c_size, c_total, c_nbr, c_val, rows, weights,
                                   acc, best, anchor, touched)
    rows, weights = _anchors(recent, r_window, r_decay, r_cap)
    r_rows, r_vals, _ = _query(r_start, r_size, r_total, r_nbr, r_val, rows, weights,
                               acc, best, anchor, touched)
    lens = (len(c_rows), len(s_rows), len(r_rows), len(a_rows), len(o_rows), len(l_rows))
    offsets = np.zeros(7, dtype=np.int64)
    for j in range(6):
        offsets[j + 1] = offsets[j] + lens[j]
    src_rows = np.empty(offsets[6], dtype=np.int64)
    src_vals = np.empty(offsets[6])
    for j, (sr, sv) in enumerate(((c_rows, c_vals), (s_rows, s_vals), (r_rows, r_vals),
                                  (a_rows, a_vals), (o_rows, o_vals), (l_rows, l_vals))):
        o = offsets[j]
        for i in range(len(sr)):
            src_rows[o + i] = sr[i]
            src_vals[o + i] = sv[i]
    return blend_gather(src_rows, src_vals, offsets, c_lead, pop_rows, ban, mark, pos, n)


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
