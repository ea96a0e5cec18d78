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

from typing import Any

import numba
import numpy as np

from stream.core.models._kernels import (
    REASON_COOCCURRENCE,
    REASON_MF,
    REASON_POPULARITY,
    blend_gather,
    cooc_accumulate,
    query_anchors,
    reset_touched,
)

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
def blend_collect(recent, c_start, c_size, c_cap, c_total, c_nbr, c_val, c_window, c_decay,  # type: ignore[no-untyped-def]
                  l_window, l_decay, r_start, r_size, r_cap, r_total, r_nbr, r_val, r_window,
                  r_decay, s_rows, s_vals, a_rows, a_vals, o_rows, o_vals, pop_rows, ban,
                  mark, acc, best, anchor, touched, dense, dense_lead, n):
    """The learned blend's candidates in one call: co-occurrence from the last
    ``c_window`` of ``recent`` (vocabulary rows, oldest first, -1 = unknown), the long
    co-occurrence view (``l_window``, 0 = off), sequential rules from the last
    ``r_window``, then :func:`stream.core.models._kernels.blend_gather` over them and the
    STAN, artist and own-history sources. ``c_*`` / ``r_*``: the co-occurrence and rules
    arenas (``SessionCooccurrence.arena``, passed array by array: a tuple argument costs
    numba's dispatcher a Python-level type check per call); ``acc``/``best``/``anchor``/
    ``touched`` is co-occurrence's query scratch."""
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
    return blend_gather(src_rows, src_vals, offsets, c_lead, pop_rows, ban, mark, dense,
                        dense_lead, n)


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
