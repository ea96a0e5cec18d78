"""Compiled inner loops (numba) for the per-event hot path.

Each kernel replaces dozens of small numpy calls or Python loop iterations, whose per-call
overhead (not arithmetic) was the cost: see "Speed" in docs/benchmarks.md. Kernels take and
mutate plain numpy arrays only; the model classes own the arrays and keep the logic that
is not hot. ``cache=True`` stores the machine code next to this file, so only the first
process after an install pays the compile (a few seconds).

Co-occurrence storage ("arena"): every track's neighbour list is a slice
``[start[r], start[r] + size[r])`` of two shared arrays ``nbr`` (neighbour row, int32) and
``val`` (weight), with room for ``cap[r]`` entries. A full slice moves to the free end of
the arena with twice the room (up to ``2 * max_nbr``); the caller guarantees enough free
room before each call and compacts the holes now and then.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np

_jit: Any = numba.njit(cache=True, nogil=True)

#: Initial room of a neighbour list.
FIRST_CAP = 8


@_jit
def _prune(start, size, nbr, val, r, keep):  # type: ignore[no-untyped-def]
    """Keep the ``keep`` heaviest neighbours of row ``r`` in their current order (ties:
    the earlier position), zeroing the rest."""
    s = start[r]
    n = size[r]
    order = np.argsort(-val[s : s + n], kind="mergesort")[:keep]
    order.sort()
    for i in range(keep):
        p = s + order[i]
        nbr[s + i] = nbr[p]
        val[s + i] = val[p]
    for i in range(keep, n):
        val[s + i] = 0.0
    size[r] = keep


@_jit
def cooc_add(start, size, cap, total, nbr, val, used, src, dst, w, max_nbr):  # type: ignore[no-untyped-def]
    """``row src: dst += w`` (appending ``dst`` if new); returns the new arena fill mark."""
    s = start[src]
    n = size[src]
    for p in range(s, s + n):
        if nbr[p] == dst:
            val[p] += w
            total[src] += w
            _rescale_if_heavy(start, size, total, val, src)
            return used
    if n >= 2 * max_nbr:
        _prune(start, size, nbr, val, src, max_nbr)
        n = size[src]
    if n >= cap[src]:
        new_cap = min(max(FIRST_CAP, 2 * cap[src]), 2 * max_nbr)
        for i in range(n):
            nbr[used + i] = nbr[s + i]
            val[used + i] = val[s + i]
        start[src] = used
        s = used
        cap[src] = new_cap
        used += new_cap
    nbr[s + n] = dst
    val[s + n] = w
    size[src] = n + 1
    total[src] += w
    return used


@_jit
def _rescale_if_heavy(start, size, total, val, src):  # type: ignore[no-untyped-def]
    """Weights are float32 and co-occurrence counts grow without bound: once a row's total
    passes 2**14, scale the row (weights and total) by 2**-6. Scores only use weight /
    total, so nothing changes for them, while an added weight stays large next to a
    float32 step (unscaled, at 3e6 a 0.13 add rounded to 0.25)."""
    if total[src] > 16384.0:
        s = start[src]
        for p in range(s, s + size[src]):
            val[p] *= 0.015625
        total[src] *= 0.015625


@_jit
def cooc_learn(start, size, cap, total, nbr, val, used, track, prevs, w, decay, backward, max_nbr):  # type: ignore[no-untyped-def]
    """One play of ``track`` after ``prevs`` (newest first): the pair (prev -> track) gains
    ``w * decay**distance``, the reverse pair ``backward`` times that."""
    for prev in prevs:
        if prev != track:
            used = cooc_add(start, size, cap, total, nbr, val, used, prev, track, w, max_nbr)
            if backward > 0:
                used = cooc_add(
                    start, size, cap, total, nbr, val, used, track, prev, w * backward, max_nbr
                )
        w *= decay
    return used


@_jit
def cooc_accumulate(start, size, total, nbr, val, rows, weights, acc, best, anchor, touched):  # type: ignore[no-untyped-def]
    """Add ``weights[j] / total[r] * val`` of each anchor row ``rows[j]`` into ``acc``
    (dense scratch, all zero on entry), remembering for each touched track the anchor that
    contributed most (``best``/``anchor``, -1 = untouched). Returns how many tracks were
    touched (their rows are ``touched[:n]``). Sums run anchor by anchor, in order."""
    n = 0
    for j in range(len(rows)):
        r = rows[j]
        if total[r] <= 0.0:  # (a fully decayed row) contributes nothing
            continue
        scale = weights[j] / total[r]
        s = start[r]
        for p in range(s, s + size[r]):
            d = nbr[p]
            c = val[p] * scale
            if anchor[d] < 0:
                touched[n] = d
                n += 1
                anchor[d] = r
                best[d] = c
            elif c > best[d]:
                best[d] = c
                anchor[d] = r
            acc[d] += c
    return n


@_jit
def reset_touched(acc, best, anchor, touched, n):  # type: ignore[no-untyped-def]
    for i in range(n):
        d = touched[i]
        acc[d] = 0.0
        best[d] = 0.0
        anchor[d] = -1


@_jit
def top_allowed(rows, scores, banned, n):  # type: ignore[no-untyped-def]
    """The (up to) ``n`` of ``rows`` with the highest positive ``scores[row]`` whose
    ``banned`` flag is unset, in no particular order; ties at the cut go to the lower row
    (deterministic)."""
    m = 0
    keep = np.empty(len(rows), dtype=np.int64)
    key = np.empty(len(rows))
    for i in range(len(rows)):
        r = rows[i]
        if not banned[r] and scores[r] > 0:
            keep[m] = r
            key[m] = scores[r]
            m += 1
    return _top_n(keep[:m], key[:m], n)


@_jit
def unique_rows(rows, mark):  # type: ignore[no-untyped-def]
    """Sorted distinct ``rows``; ``mark`` is an all-False scratch flag per row (restored)."""
    out = np.empty(len(rows), dtype=np.int64)
    m = 0
    for r in rows:
        if not mark[r]:
            mark[r] = True
            out[m] = r
            m += 1
    out = np.sort(out[:m])
    for r in out:
        mark[r] = False
    return out


@_jit
def compact_arena(start, size, cap, nbr, val, n_rows, new_nbr, new_val):  # type: ignore[no-untyped-def]
    """Copy every row's slice, in row order, into the fresh arrays; returns the fill mark."""
    used = 0
    for r in range(n_rows):
        c = cap[r]
        if c == 0:
            continue
        s = start[r]
        for i in range(size[r]):
            new_nbr[used + i] = nbr[s + i]
            new_val[used + i] = val[s + i]
        start[r] = used
        used += c
    return used


@_jit
def cooc_renumber(start, size, cap, nbr, val, n_rows, remap):  # type: ignore[no-untyped-def]
    """Renumber the neighbours of rows ``0 .. n_rows-1`` in place through ``remap`` (old row
    -> new row, -1 = evicted: dropped, keeping the order of the others; rows beyond
    ``remap`` count as evicted). The row totals keep the dropped mass, as when pruning.
    One pass over the arena, no allocation (catalogue eviction, Recommender.evict_tracks)."""
    m = len(remap)
    for r in range(n_rows):
        if cap[r] == 0:
            continue
        s = start[r]
        n = size[r]
        k = 0
        for p in range(s, s + n):
            d = nbr[p]
            new = remap[d] if d < m else -1
            if new >= 0:
                nbr[s + k] = new
                val[s + k] = val[p]
                k += 1
        for p in range(s + k, s + n):
            nbr[p] = 0
            val[p] = 0.0
        size[r] = k


@_jit
def mf_step(item_factors, user, rows, targets, lr, l2):  # type: ignore[no-untyped-def]
    """One SGD step of squared loss with L2 on (user, rows) at once: the same update as
    ``err = t - V[rows] @ u; V[rows] = (1 - lr*l2) V[rows] + lr * err u; u = (1 - lr*l2) u
    + lr * err @ V_old[rows]``, for distinct ``rows`` (the caller drops repeats)."""
    k = user.shape[0]
    m = len(rows)
    shrink = 1.0 - lr * l2
    err = np.empty(m)
    for i in range(m):
        acc = 0.0
        for f in range(k):
            acc += item_factors[rows[i], f] * user[f]
        err[i] = targets[i] - acc
    grad = np.zeros(k)
    for i in range(m):
        r = rows[i]
        e = err[i]
        for f in range(k):
            old = item_factors[r, f]
            grad[f] += e * old
            item_factors[r, f] = shrink * old + lr * e * user[f]
    for f in range(k):
        user[f] = shrink * user[f] + lr * grad[f]


@_jit
def _worse(ka, ra, kb, rb):  # type: ignore[no-untyped-def]
    """Whether entry (key ``ka``, row ``ra``) ranks below (``kb``, ``rb``): a lower key, or
    the same key and a higher row."""
    return ka < kb or (ka == kb and ra > rb)


@_jit
def heap_push(hk, hr, c, k, r):  # type: ignore[no-untyped-def]
    """Add (key ``k``, row ``r``) to the heap of the ``c`` entries ``hk``/``hr`` (its root
    the worst, :func:`_worse`): sift up while worse than the parent."""
    j = c
    while j > 0:
        parent = (j - 1) >> 1
        if not _worse(k, r, hk[parent], hr[parent]):
            break
        hk[j] = hk[parent]
        hr[j] = hr[parent]
        j = parent
    hk[j] = k
    hr[j] = r


@_jit
def heap_replace_root(hk, hr, n, k, r):  # type: ignore[no-untyped-def]
    """Replace the worst of the ``n`` kept entries (the root) by (``k``, ``r``) and sift
    it down: move the worse child up while it is worse."""
    j = 0
    while True:
        c = 2 * j + 1
        if c >= n:
            break
        if c + 1 < n and _worse(hk[c + 1], hr[c + 1], hk[c], hr[c]):
            c += 1
        if not _worse(hk[c], hr[c], k, r):
            break
        hk[j] = hk[c]
        hr[j] = hr[c]
        j = c
    hk[j] = k
    hr[j] = r


@_jit
def _top_n(rows, key, n):  # type: ignore[no-untyped-def]
    """The ``n`` entries of ``rows`` with the highest ``key`` (aligned arrays), in no
    particular order; ties at the cut go to the lower row, NaN keys rank last.

    A heap of the ``n`` best so far (its root the worst of them), so one pass with a
    comparison per entry (``np.partition`` plus a tie pass cost ~12 us for 50 of ~450
    co-occurrence candidates)."""
    m = len(rows)
    if m <= n:
        return rows.copy()
    hk = np.empty(n)
    hr = np.empty(n, dtype=np.int64)
    for i in range(n):  # heapify the first n
        k = key[i]
        if np.isnan(k):
            k = -np.inf
        heap_push(hk, hr, i, k, rows[i])
    for i in range(n, m):
        k = key[i]
        if np.isnan(k):
            k = -np.inf
        r = rows[i]
        if _worse(hk[0], hr[0], k, r):  # better than the worst kept
            heap_replace_root(hk, hr, n, k, r)
    return hr


@_jit
def _normalise_into(part, scores, w):  # type: ignore[no-untyped-def]
    """``part = w * normalise(scores)`` (see stream.core.ranking.normalise)."""
    hi = scores.max()
    lo = scores.min()
    if lo >= 0:
        if hi > 0:
            for i in range(len(scores)):
                part[i] = w * (scores[i] / hi)
        else:
            part[:] = 0.0
    elif hi <= lo:
        part[:] = 0.0
    else:
        span = hi - lo
        for i in range(len(scores)):
            part[i] = w * ((scores[i] - lo) / span)


@_jit
def _unbanned(ban, size):  # type: ignore[no-untyped-def]
    """Rows ``0 .. size-1`` whose ``ban`` flag is unset."""
    out = np.empty(size, dtype=np.int64)
    m = 0
    for r in range(size):
        if not ban[r]:
            out[m] = r
            m += 1
    return out[:m]


@_jit
def _dot_rows(factors, user, rows):  # type: ignore[no-untyped-def]
    out = np.empty(len(rows))
    k = len(user)
    for i in range(len(rows)):
        r = rows[i]
        acc = 0.0
        for f in range(k):
            acc += factors[r, f] * user[f]
        out[i] = acc
    return out


@_jit
def _dot_all(factors, user, size):  # type: ignore[no-untyped-def]
    """``_dot_rows(factors, user, np.arange(size))``, bit for bit (each row's sum in the
    same order), four rows at a time: one row's additions wait on each other, four
    independent sums keep the CPU busy (the MF scan of every track was ~1 ns per factor)."""
    out = np.empty(size)
    k = len(user)
    i = 0
    while i + 4 <= size:
        a0 = a1 = a2 = a3 = 0.0
        for f in range(k):
            u = user[f]
            a0 += factors[i, f] * u
            a1 += factors[i + 1, f] * u
            a2 += factors[i + 2, f] * u
            a3 += factors[i + 3, f] * u
        out[i] = a0
        out[i + 1] = a1
        out[i + 2] = a2
        out[i + 3] = a3
        i += 4
    for r in range(i, size):
        acc = 0.0
        for f in range(k):
            acc += factors[r, f] * user[f]
        out[r] = acc
    return out


@_jit
def _blend_in(total, best, reason, scores, w, code):  # type: ignore[no-untyped-def]
    """Add ``w * normalise(scores)`` to ``total``; where it is the largest part so far,
    the reason becomes ``code`` (strictly larger: the earlier component wins ties)."""
    part = np.empty(len(scores))
    _normalise_into(part, scores, w)
    for i in range(len(scores)):
        total[i] += part[i]
        if part[i] > best[i]:
            best[i] = part[i]
            reason[i] = code


#: Reason codes returned by :func:`blend_rank` (0: none of the components contributed).
REASON_POPULARITY, REASON_COOCCURRENCE, REASON_MF = 1, 2, 3


@_jit
def blend_rank(  # type: ignore[no-untyped-def]
    size, n_pop, n, use_cooc, use_mf, pick_mf, bw_pop, bw_cooc, bw_mf,
    pop_members, pop_w, pop_total, acc, lead, touched, factors, user, ban, mark,
):
    """Candidates -> blended, ranked list, in one call (the per-query numpy calls were the
    cost; see Recommender.recommend for the reference semantics it follows).

    Candidates: the ``n_pop`` heaviest non-banned tracks (:func:`pop_picks`), the ``n``
    best co-occurrence tracks among ``touched`` (positive scores in ``acc``), and with
    ``use_mf and pick_mf`` the ``n`` best MF scores ``factors[row] @ user`` over every row
    (:func:`mf_picks`; with ``pick_mf`` off, or an empty ``user``, MF only scores the
    other sources' candidates); then :func:`blend_picked` scores and orders them."""
    pop = pop_picks(size, n_pop, pop_members, pop_w, ban)
    cooc = np.empty(0, dtype=np.int64)
    if use_cooc and len(touched):
        cooc = top_allowed(touched, acc, ban, n)
    use_mf = use_mf and len(user) > 0
    mf = np.empty(0, dtype=np.int64)
    if use_mf and pick_mf:
        mf = mf_picks(size, n, factors, user, ban)
    return blend_picked(use_cooc, use_mf, bw_pop, bw_cooc, bw_mf, pop_w, pop_total, acc,
                        lead, factors, user, mark, pop, cooc, mf)


@_jit
def pop_picks(size, n_pop, pop_members, pop_w, ban):  # type: ignore[no-untyped-def]
    """:func:`blend_rank`'s trending candidates: the ``n_pop`` heaviest non-banned tracks
    of the kept top set ``pop_members``, or of every row when bans leave it short (in no
    particular order; ties to the lower row)."""
    allowed = np.empty(len(pop_members), dtype=np.int64)
    m = 0
    for r in pop_members:
        if r < size and not ban[r]:
            allowed[m] = r
            m += 1
    allowed = allowed[:m]
    if m < n_pop and len(pop_members) < size:
        allowed = _unbanned(ban, size)
    return _top_n(allowed, pop_w[allowed], n_pop)


@_jit
def mf_picks(size, n, factors, user, ban):  # type: ignore[no-untyped-def]
    """:func:`blend_rank`'s MF candidates: the ``n`` non-banned rows with the best
    ``factors[row] @ user`` (in no particular order; ties to the lower row)."""
    mf = _dot_all(factors, user, size)
    free = _unbanned(ban, size)
    return _top_n(free, mf[free], n)


@_jit
def blend_picked(  # type: ignore[no-untyped-def]
    use_cooc, use_mf, bw_pop, bw_cooc, bw_mf, pop_w, pop_total, acc, lead, factors, user,
    mark, pop, cooc, mf,
):
    """:func:`blend_rank` of its candidates ``pop``, ``cooc`` and ``mf`` (each source's
    picks): scores per component are normalised within the candidates, weighted and
    summed (popularity, co-occurrence, MF, in that order). Returns the candidate rows
    ordered best first (stable on row order), their totals, reason codes (the component
    contributing most) and the anchor row that led co-occurrence there (-1 if none)."""
    every_pick = np.empty(len(pop) + len(cooc) + len(mf), dtype=np.int64)
    every_pick[:len(pop)] = pop
    every_pick[len(pop):len(pop) + len(cooc)] = cooc
    every_pick[len(pop) + len(cooc):] = mf
    rows = unique_rows(every_pick, mark)
    c = len(rows)
    if c == 0:
        return rows, np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    # -- components, blend, reasons
    denom = pop_total if pop_total != 0.0 else 1.0
    total = np.zeros(c)
    best = np.zeros(c)
    reason = np.zeros(c, dtype=np.int64)
    if bw_pop != 0.0:
        scores = np.empty(c)
        for i in range(c):
            scores[i] = pop_w[rows[i]] / denom
        _blend_in(total, best, reason, scores, bw_pop, REASON_POPULARITY)
    if use_cooc and bw_cooc != 0.0:
        scores = np.empty(c)
        for i in range(c):
            scores[i] = acc[rows[i]]
        _blend_in(total, best, reason, scores, bw_cooc, REASON_COOCCURRENCE)
    if use_mf and bw_mf != 0.0:
        _blend_in(total, best, reason, _dot_rows(factors, user, rows), bw_mf, REASON_MF)
    order = np.argsort(-total, kind="mergesort")
    leads = np.full(c, -1, dtype=np.int64)
    if use_cooc:
        for i in range(c):
            leads[i] = lead[rows[i]]
    return rows[order], total[order], reason[order], leads[order]


@_jit
def round6(values):  # type: ignore[no-untyped-def]
    """Python's ``round(v, 6)`` of each value where floating point decides it exactly, NaN
    where not (the caller rounds those in Python): ``rint(v * 1e6) / 1e6`` when
    ``|v * 1e6| < 2**31`` and ``v * 1e6`` is not within 1e-6 of a half. Then the product's
    error (below 2.4e-7) cannot move ``rint`` off the integer ``d`` nearest the exact
    ``v * 10**6``, and ``d`` and 1e6 are exact doubles, so IEEE division gives the double
    nearest ``d * 10**-6``: what Python's round returns through its decimal string (the
    sign of a zero included). Not finite: NaN. About a fifth of the per-item cost of
    building a ranking's results was ``round``."""
    out = np.empty(len(values))
    for i in range(len(values)):
        t = values[i] * 1e6
        if abs(t) < 2147483648.0:
            d = np.rint(t)
            if abs(t - d) < 0.499999:
                out[i] = d / 1e6
                continue
        out[i] = np.nan
    return out


@_jit
def among(rows, k, r):  # type: ignore[no-untyped-def]
    """Whether ``r`` is one of ``rows[:k]``."""
    for j in range(k):  # noqa: SIM110 (a loop numba compiles; any() of a generator it may not)
        if rows[j] == r:
            return True
    return False


@_jit
def query_anchors(hist_rows, cap, decay):  # type: ignore[no-untyped-def]
    """The anchors of a query: from ``hist_rows`` (the listener's recent tracks' rows,
    oldest first, -1 = unknown), newest first, the distinct rows that have a neighbour list,
    weighted ``decay ** distance`` (distance counted over every recent track)."""
    m = len(hist_rows)
    rows = np.empty(m, dtype=np.int64)
    weights = np.empty(m)
    k = 0
    w = 1.0
    for i in range(m - 1, -1, -1):
        r = hist_rows[i]
        if 0 <= r < len(cap) and cap[r] != 0 and not among(rows, k, r):
            rows[k] = r
            weights[k] = w
            k += 1
        w *= decay
    return rows[:k], weights[:k]


@_jit
def query_bans(ban, ban_recent, ban_other, flag):  # type: ignore[no-untyped-def]
    """``ban[r] = flag`` for the known rows of ``ban_recent`` (-1 = unknown, skipped) and
    the rows of ``ban_other`` inside ``ban`` (rows of another vocabulary may lie past it)."""
    for r in ban_recent:
        if r >= 0:
            ban[r] = flag
    for r in ban_other:
        if 0 <= r < len(ban):
            ban[r] = flag


@_jit
def query_accumulate(start, csize, cap, total, nbr, val, hist_rows, decay, acc, best, anchor,  # type: ignore[no-untyped-def]
                     touched):
    """Co-occurrence from the anchors of ``hist_rows`` (:func:`query_anchors`,
    :func:`cooc_accumulate`) into the scratch, the anchors themselves at 0; returns how
    many rows ``touched`` lists (:func:`reset_touched` clears them)."""
    a_rows, a_weights = query_anchors(hist_rows, cap, decay)
    n_touched = 0
    if len(a_rows):
        n_touched = cooc_accumulate(
            start, csize, total, nbr, val, a_rows, a_weights, acc, best, anchor, touched
        )
        for r in a_rows:
            acc[r] = 0.0
    return n_touched


@_jit
def open_query(ban, ban_recent, ban_other, use_cooc, start, csize, cap, total, nbr, val,  # type: ignore[no-untyped-def]
               hist_rows, decay, acc, best, anchor, touched):
    """A query's set-up: ban ``ban_recent`` (-1 = unknown, skipped) and ``ban_other``,
    and (``use_cooc``) accumulate co-occurrence from the anchors of ``hist_rows``
    (:func:`query_accumulate`); returns how many rows ``touched`` lists.
    :func:`close_query` undoes both."""
    query_bans(ban, ban_recent, ban_other, True)
    if not use_cooc:
        return 0
    return query_accumulate(start, csize, cap, total, nbr, val, hist_rows, decay, acc, best,
                            anchor, touched)


@_jit
def close_query(ban, ban_recent, ban_other, acc, best, anchor, touched, n_touched):  # type: ignore[no-untyped-def]
    """Leave the scratch (``acc``, ``best``, ``anchor``) and ``ban`` as
    :func:`open_query` found them."""
    reset_touched(acc, best, anchor, touched, n_touched)
    query_bans(ban, ban_recent, ban_other, False)


@_jit
def rank_query(  # type: ignore[no-untyped-def]
    size, n_pop, n, use_cooc, use_mf, pick_mf, bw_pop, bw_cooc, bw_mf,
    pop_members, pop_w, pop_total,
    start, csize, cap, total, nbr, val, hist_rows, decay, acc, best, anchor, touched,
    factors, user, ban, mark, ban_recent, ban_other,
):
    """One whole query: ban ``ban_recent`` (-1 = unknown, skipped) and ``ban_other``,
    accumulate co-occurrence from the anchors of ``hist_rows`` (:func:`query_accumulate`;
    the anchors themselves score 0), rank with :func:`blend_rank`, then leave the scratch
    (``acc``, ``best``, ``anchor``) and ``ban`` as they were. Returns what
    :func:`blend_rank` returns."""
    n_touched = open_query(ban, ban_recent, ban_other, use_cooc, start, csize, cap, total,
                           nbr, val, hist_rows, decay, acc, best, anchor, touched)
    out = blend_rank(
        size, n_pop, n, use_cooc, use_mf, pick_mf, bw_pop, bw_cooc, bw_mf,
        pop_members, pop_w, pop_total, acc, anchor, touched[:n_touched], factors, user,
        ban, mark,
    )
    close_query(ban, ban_recent, ban_other, acc, best, anchor, touched, n_touched)
    return out


@_jit
def rank_components(  # type: ignore[no-untyped-def]
    size, k, n, do_pop, do_mf, do_cooc, pick_mf_cooc,
    do_fixed, n_pop_fixed, use_cooc_fixed, use_mf_fixed, pick_mf_fixed, bw_pop, bw_cooc,
    bw_mf, pop_members, pop_w, pop_total,
    start, csize, cap, total, nbr, val, hist_rows, decay, acc, best, anchor, touched,
    factors, user, has_user, ban, mark, ban_recent, ban_other,
):
    """The single components' lists and the fixed blend's of one query in one call
    (Recommender.component_ids: the replay's evaluation, the live per-component quality):
    :func:`rank_query`'s bans and co-occurrence query once (``cooccurrence`` and
    ``fixed`` read the same accumulation), then :func:`component_lists`. Leaves the
    scratch as it found it."""
    n_touched = open_query(ban, ban_recent, ban_other, do_cooc or (do_fixed and use_cooc_fixed),
                           start, csize, cap, total, nbr, val, hist_rows, decay, acc, best,
                           anchor, touched)
    out = component_lists(
        size, k, n, do_pop, do_mf, do_cooc, pick_mf_cooc, do_fixed, n_pop_fixed,
        use_cooc_fixed, use_mf_fixed, pick_mf_fixed, bw_pop, bw_cooc, bw_mf, pop_members,
        pop_w, pop_total, acc, anchor, touched[:n_touched], factors, user, has_user, ban,
        mark,
    )
    close_query(ban, ban_recent, ban_other, acc, best, anchor, touched, n_touched)
    return out


@_jit
def component_lists(  # type: ignore[no-untyped-def]
    size, k, n, do_pop, do_mf, do_cooc, pick_mf_cooc,
    do_fixed, n_pop_fixed, use_cooc_fixed, use_mf_fixed, pick_mf_fixed, bw_pop, bw_cooc,
    bw_mf, pop_members, pop_w, pop_total, acc, lead, touched, factors, user, has_user, ban,
    mark,
):
    """The ranked rows of :func:`blend_rank` for ``popularity``, ``mf``, ``cooccurrence``
    and ``fixed`` (each flag ``do_*``; empty when off) with the bans set in ``ban`` and
    the co-occurrence query accumulated (``acc``/``lead`` dense, ``touched`` its rows),
    each with exactly the arguments :func:`rank_query` ranking that variant alone passes
    -- a single component's weight 1, the trending fill at 1e-6, ``n_pop`` = ``n`` for
    popularity and ``k`` otherwise, MF only for ``mf`` (``has_user``: ``user`` holds the
    listener's vector), co-occurrence only for ``cooccurrence`` and (``use_cooc_fixed``)
    the fixed blend; the fixed blend's own ``n_pop``, flags and weights -- so the lists
    are the same. Each source's picks (:func:`pop_picks` per ``n_pop``, the co-occurrence
    and the MF picks) are made once for the lists that read them: the same function of
    the same bans (:func:`blend_rank` of each list made them again)."""
    no_user = user[:0]
    empty = np.empty(0, dtype=np.int64)
    mf_user = user if has_user else no_user
    fixed_user = user if use_mf_fixed else no_user
    # which picks which list reads (blend_rank's conditions)
    fixed_cooc = do_fixed and use_cooc_fixed and len(touched) > 0
    mf_mf = do_mf and len(mf_user) > 0
    fixed_mf = do_fixed and len(fixed_user) > 0
    cooc = empty
    if (do_cooc and len(touched) > 0) or fixed_cooc:
        cooc = top_allowed(touched, acc, ban, n)
    mf = empty
    if mf_mf or (fixed_mf and pick_mf_fixed):
        mf = mf_picks(size, n, factors, user, ban)
    pop_n = pop_k = empty
    if do_pop or (do_fixed and n_pop_fixed == n):
        pop_n = pop_picks(size, n, pop_members, pop_w, ban)
    if do_mf or do_cooc or (do_fixed and n_pop_fixed == k):
        pop_k = pop_n if k == n and len(pop_n) else pop_picks(size, k, pop_members, pop_w, ban)
    pop_rows = mf_rows = cooc_rows = fixed_rows = empty
    if do_pop:
        pop_rows = blend_picked(False, False, 1e-6, 0.0, 0.0, pop_w, pop_total, acc, lead,
                                factors, no_user, mark, pop_n, empty, empty)[0]
    if do_mf:
        mf_rows = blend_picked(False, mf_mf, 1e-6, 0.0, 1.0, pop_w, pop_total, acc, lead,
                               factors, mf_user, mark, pop_k, empty,
                               mf if mf_mf else empty)[0]
    if do_cooc:
        cooc_rows = blend_picked(True, False, 1e-6, 1.0, 0.0, pop_w, pop_total, acc, lead,
                                 factors, no_user, mark, pop_k, cooc, empty)[0]
    if do_fixed:
        pop_f = pop_n if n_pop_fixed == n else pop_k
        if n_pop_fixed != n and n_pop_fixed != k:
            pop_f = pop_picks(size, n_pop_fixed, pop_members, pop_w, ban)
        fixed_rows = blend_picked(
            use_cooc_fixed, fixed_mf, bw_pop, bw_cooc, bw_mf, pop_w, pop_total, acc, lead,
            factors, fixed_user, mark, pop_f, cooc if fixed_cooc else empty,
            mf if fixed_mf and pick_mf_fixed else empty,
        )[0]
    return pop_rows, mf_rows, cooc_rows, fixed_rows


@_jit
def rank_many(  # type: ignore[no-untyped-def]
    size, n_pop, n, use_cooc, pick_mf, bw_pop, bw_cooc, bw_mf,
    pop_members, pop_w, pop_total,
    start, csize, cap, total, nbr, val, hist_rows, hist_off, decay, acc, best, anchor,
    touched, factors, users, has_user, ban, mark, ban_recent, ban_recent_off,
    out_rows, out_totals, out_reasons, out_leads, out_count,
):
    """:func:`rank_query` for many listeners in one call (one compiled call per flush
    instead of one per listener: their arguments' unboxing and the Python around each
    call were half a ranking's cost). Listener ``q`` has the history rows
    ``hist_rows[hist_off[q]:hist_off[q + 1]]``, the bans
    ``ban_recent[ban_recent_off[q]:ban_recent_off[q + 1]]`` and, if ``has_user[q]``, the
    MF vector ``users[q]``. Its ranked candidates go to row ``q`` of the ``out_*`` arrays
    (``out_count[q]`` of them; the rows must have room for ``n_pop + 2 * n``)."""
    no_other = np.empty(0, dtype=np.int64)
    for q in range(len(has_user)):
        rows, totals, reasons, leads = rank_query(
            size, n_pop, n, use_cooc, has_user[q], pick_mf, bw_pop, bw_cooc, bw_mf,
            pop_members, pop_w, pop_total,
            start, csize, cap, total, nbr, val, hist_rows[hist_off[q] : hist_off[q + 1]],
            decay, acc, best, anchor, touched, factors, users[q], ban, mark,
            ban_recent[ban_recent_off[q] : ban_recent_off[q + 1]], no_other,
        )
        c = len(rows)
        out_count[q] = c
        out_rows[q, :c] = rows
        out_totals[q, :c] = totals
        out_reasons[q, :c] = reasons
        out_leads[q, :c] = leads


# -- the learned blend (stream.recommender._blend_candidates) -------------------------------


@_jit
def blend_gather(src_rows, src_vals, src_off, c_lead, pop_rows, ban, mark, pos, n):  # type: ignore[no-untyped-def]
    """The learned blend's candidates and every source's score of each.

    Source ``j`` is ``src_rows[src_off[j]:src_off[j + 1]]`` (distinct rows) with
    ``src_vals``; source 0 is co-occurrence, whose lead row per entry is ``c_lead``. Each
    source proposes its ``n`` best unbanned rows with a positive score (ties: the lower
    row), trending proposes ``pop_rows``. Returns the sorted distinct candidates, their
    score per source (``len x sources``, 0 where a source does not score a row) and their
    co-occurrence lead (-1: none). ``mark`` (all False) and ``pos`` (all -1) are per-row
    scratch, left as found: ``pos`` maps a candidate's row to its index, so one pass over
    each source fills the candidates' scores (before: every source row was scattered
    into a rows x sources matrix, read back and cleared)."""
    n_src = len(src_off) - 1
    picks = np.empty(len(pop_rows) + n_src * n, dtype=np.int64)
    m = 0
    for r in pop_rows:
        picks[m] = r
        m += 1
    for col in range(n_src):
        a = src_off[col]
        b = src_off[col + 1]
        keep = np.empty(b - a, dtype=np.int64)
        key = np.empty(b - a)
        c = 0
        for i in range(a, b):
            r = src_rows[i]
            v = src_vals[i]
            if v > 0.0 and not ban[r]:
                keep[c] = r
                key[c] = v
                c += 1
        top = _top_n(keep[:c], key[:c], n)
        for r in top:
            picks[m] = r
            m += 1
    cands = unique_rows(picks[:m], mark)
    comp = np.zeros((len(cands), n_src))
    lead = np.full(len(cands), -1, dtype=np.int64)
    for i in range(len(cands)):
        pos[cands[i]] = i
    for col in range(n_src):
        a = src_off[col]
        for i in range(a, src_off[col + 1]):
            p = pos[src_rows[i]]
            if p >= 0:
                comp[p, col] = src_vals[i]
                if col == 0:
                    lead[p] = c_lead[i - a]
    for i in range(len(cands)):
        pos[cands[i]] = -1
    return cands, comp, lead


@_jit
def _scale_into(values, out, col):  # type: ignore[no-untyped-def]
    """``out[:, col]`` = non-negative ``values`` over their maximum (all zero stays zero)."""
    hi = 0.0
    for v in values:
        if v > hi:
            hi = v
    for i in range(len(values)):
        out[i, col] = values[i] / hi if hi > 0.0 else 0.0


#: the run length :func:`_desc_order` sorts by insertion before merging
_RUN = 16


@_jit
def _desc_order(values, idx):  # type: ignore[no-untyped-def]
    """``idx[np.argsort(-values[idx], kind="mergesort")]`` (stable: ties keep their order),
    for the short lists of a ranking by insertion sort of runs of ``_RUN`` then a merge of
    the runs (numba's mergesort allocates and cost ~5 us per candidate list); mergesort
    itself past 256 entries or with a NaN."""
    n = len(idx)
    for i in range(n):
        if np.isnan(values[idx[i]]):
            n = -1
            break
    if n < 0 or n > 256:
        return idx[np.argsort(-values[idx], kind="mergesort")]
    out = idx.copy()
    for lo in range(0, n, _RUN):  # insertion sort of runs of _RUN entries
        hi = min(lo + _RUN, n)
        for i in range(lo + 1, hi):
            j = out[i]
            v = values[j]
            p = i - 1
            while p >= lo and values[out[p]] < v:
                out[p + 1] = out[p]
                p -= 1
            out[p + 1] = j
    if n <= _RUN:
        return out
    # then merge the runs pairwise (a longer list's insertion sort grew as n^2: ~60
    # positive co-occurrence scores cost more than their merge); the left run wins ties
    src = out
    dst = np.empty(n, dtype=np.int64)
    width = _RUN
    while width < n:
        for lo in range(0, n, 2 * width):
            mid = min(lo + width, n)
            hi = min(lo + 2 * width, n)
            i = lo
            j = mid
            o = lo
            while i < mid and j < hi:
                if values[src[j]] > values[src[i]]:
                    dst[o] = src[j]
                    j += 1
                else:
                    dst[o] = src[i]
                    i += 1
                o += 1
            while i < mid:
                dst[o] = src[i]
                i += 1
                o += 1
            while j < hi:
                dst[o] = src[j]
                j += 1
                o += 1
        src, dst = dst, src
        width *= 2
    return src


#: up to this many values, :func:`_recip_rank_into` ranks by counting (:func:`_stable_ranks`)
_COUNT_MAX = 512


@_jit
def _stable_ranks(keys):  # type: ignore[no-untyped-def]
    """Each of ``keys``' position in their stable descending sort (``keys`` contiguous,
    no NaN): how many are greater (n^2 comparisons in a loop the compiler vectorises),
    plus how many earlier ones are equal (equal keys, and only they, have the same count
    of greater ones). On a ranking's ~80 candidates a comparison sort cost ~2 us a column,
    mostly mispredicted branches on indirect keys; this ~0.6 us."""
    n = len(keys)
    ranks = np.empty(n, dtype=np.int64)
    for i in range(n):
        x = keys[i]
        c = np.int32(0)
        for j in range(n):
            c += np.int32(keys[j] > x)
        ranks[i] = c
    earlier = np.zeros(n, dtype=np.int64)
    for i in range(n):
        g = ranks[i]
        ranks[i] = g + earlier[g]
        earlier[g] += 1
    return ranks


@_jit
def desc_order_all(values):  # type: ignore[no-untyped-def]
    """``np.argsort(-values, kind="stable")``: by :func:`_stable_ranks` up to
    ``_COUNT_MAX`` values without NaN, else :func:`_desc_order`."""
    m = len(values)
    ok = m <= _COUNT_MAX
    for i in range(m):
        if np.isnan(values[i]):
            ok = False
            break
    if not ok:
        return _desc_order(values, np.arange(m))
    keys = np.empty(m)
    for i in range(m):
        keys[i] = values[i]
    ranks = _stable_ranks(keys)
    order = np.empty(m, dtype=np.int64)
    for i in range(m):
        order[ranks[i]] = i
    return order


@_jit
def _recip_rank_into(values, out, col, signed):  # type: ignore[no-untyped-def]
    """``out[:, col]`` = 1 / (1 + rank) of each value, best first (stable: ties keep their
    order); 0 where a non-negative source does not score the row (unless ``signed``)."""
    m = len(values)
    if signed:
        order = desc_order_all(values)
        for j in range(m):
            out[order[j], col] = 1.0 / (j + 1)
        return
    # only the positive values rank (they come first in the full stable sort, in the same
    # order): rank those alone
    pos = np.empty(m, dtype=np.int64)
    keys = np.empty(m)
    n = 0
    for i in range(m):
        out[i, col] = 0.0
        if values[i] > 0.0:
            pos[n] = i
            keys[n] = values[i]
            n += 1
    if n > _COUNT_MAX:
        order = _desc_order(values, pos[:n])
        for j in range(n):
            out[order[j], col] = 1.0 / (j + 1)
        return
    ranks = _stable_ranks(keys[:n])
    for i in range(n):
        out[pos[i], col] = 1.0 / (ranks[i] + 1)


@_jit
def blend_features(cands, comp, pop, mf, skip, same_artist, recent_artist, first_seen,  # type: ignore[no-untyped-def]
                   now_ms, hist, w_cooc, w_mf, w_pop, day_ms, last, out):
    """The feature rows of :data:`stream.models.blend.FEATURES` into ``out``
    (``len(cands) x N_FEATURES``). ``comp`` holds the co-occurrence, STAN, SR, artist,
    own-history and long co-occurrence scores (columns 0-5); ``hist`` is the scaled log
    history length; ``last`` the SR and co-occurrence scores from the last play alone
    (:func:`last_play_scores`); ``recent_artist`` each candidate's artist's (decayed) share
    of the listener's recent plays."""
    m = len(cands)
    _scale_into(comp[:, 0], out, 1)
    _scale_into(comp[:, 1], out, 2)
    _scale_into(comp[:, 2], out, 3)
    _scale_into(pop, out, 4)
    lo = np.inf
    hi = -np.inf
    for v in mf:
        lo = min(lo, v)
        hi = max(hi, v)
    for i in range(m):  # stream.ranking.normalise: signed scores min-max
        if lo >= 0.0:
            out[i, 5] = mf[i] / hi if hi > 0.0 else 0.0
        else:
            out[i, 5] = (mf[i] - lo) / (hi - lo) if hi > lo else 0.0
    _recip_rank_into(comp[:, 0], out, 6, False)
    _recip_rank_into(comp[:, 1], out, 7, False)
    _recip_rank_into(comp[:, 2], out, 8, False)
    _recip_rank_into(pop, out, 9, False)
    _recip_rank_into(mf, out, 10, True)
    _scale_into(comp[:, 3], out, 19)
    _recip_rank_into(comp[:, 3], out, 20, False)
    _scale_into(comp[:, 4], out, 21)
    _recip_rank_into(comp[:, 4], out, 22, False)
    n_first = len(first_seen)
    for i in range(m):
        out[i, 0] = w_cooc * out[i, 1] + w_mf * out[i, 5] + w_pop * out[i, 4]
        out[i, 11] = skip[i]
        out[i, 12] = hist * out[i, 1]
        out[i, 13] = hist * out[i, 2]
        out[i, 14] = hist * out[i, 5]
        r = cands[i]
        first = first_seen[r] if r < n_first else 0
        out[i, 15] = math.log1p(max(now_ms - first, 0) / day_ms) / 3.0 if first > 0 else 0.0
        out[i, 16] = math.log1p(1e4 * pop[i]) / 10.0
        out[i, 17] = same_artist[i]
        out[i, 18] = 1.0 if comp[i, 4] > 0.0 else 0.0
    for col, src in ((23, 0), (24, 1), (25, 2)):  # each source's share of its mass
        total = 0.0
        for i in range(m):
            total += comp[i, src]
        for i in range(m):
            out[i, col] = comp[i, src] / total if total > 0.0 else 0.0
    for i in range(m):  # agreement of the sequential and the neighbourhood models
        out[i, 26] = out[i, 3] * out[i, 2]
        out[i, 27] = out[i, 3] * out[i, 1]
    _scale_into(comp[:, 5], out, 28)  # co-occurrence over the long history
    _recip_rank_into(comp[:, 5], out, 29, False)
    for i in range(m):
        out[i, 30] = hist * out[i, 28]
    for col, src in ((31, 1), (32, 2), (33, 3), (34, 28)):  # log of the normalised scores
        for i in range(m):
            out[i, col] = _log_score(out[i, src])
    _scale_into(last[:, 0], out, 35)  # the last play's own rules and neighbours
    _scale_into(last[:, 1], out, 36)
    _recip_rank_into(last[:, 0], out, 37, False)
    _recip_rank_into(last[:, 1], out, 38, False)
    for i in range(m):
        out[i, 39] = recent_artist[i]


@_jit
def _log_score(v):  # type: ignore[no-untyped-def]
    """``stream.core.models.blend.log_score`` of one value (0 for 0; the same arithmetic)."""
    if v <= 0.0:
        return 0.0
    return max(math.log(v) / 7.0 + 1.0, 0.0)


@_jit
def last_play_scores(start, size, total, nbr, val, row, cands, dense, out, col):  # type: ignore[no-untyped-def]
    """``out[i, col]`` = the weight of ``cands[i]`` in the neighbour list of ``row`` (the
    listener's last play; ``val / total`` as :func:`cooc_accumulate` adds it with weight
    1), 0 when it is not there or ``row`` < 0. ``dense`` (float per track, all zero) is
    left all zero."""
    for i in range(len(cands)):
        out[i, col] = 0.0
    if row < 0 or row >= len(total) or total[row] <= 0.0:
        return
    scale = 1.0 / total[row]
    s = start[row]
    for p in range(s, s + size[row]):
        dense[nbr[p]] = val[p] * scale
    for i in range(len(cands)):
        out[i, col] = dense[cands[i]]
    for p in range(s, s + size[row]):
        dense[nbr[p]] = 0.0
