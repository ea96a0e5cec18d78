"""Compiled kernels of the learning side of a play (``Recommender.learn_one``).

The learned blend's softmax step was ~20 numpy calls a play (``X @ w``, the softmax, ``p @
X``, the float32 row, two finiteness checks, the step, the weight bound), each ~1 us of
set-up around a few hundred flops; here it is one call (:func:`softmax_learn`) that finds
the played track among the candidates, builds the step row and takes the step.

Not bit for bit numpy's arithmetic: the sums are sequential (BLAS's ``X @ w`` and ``p @
X`` and numpy's pairwise ``p.sum()`` sum in other orders) and ``exp`` is libm's (numpy's
AVX-512 ``exp`` differs in the last bit for some inputs). The row is rounded to float32
(what a peer receives), which absorbs differences of ~1e-16 nearly always; the lists of
the three real logs were the same to the sixth digit (docs/benchmarks.md, "Issue 19,
session 17: learning a play").
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np

_jit: Any = numba.njit(cache=True, nogil=True)

#: :func:`softmax_learn`'s outcomes
NO_STEP = 0  # the track is not a candidate, or fewer than two candidates
BAD_ROW = 1  # the row is not finite or beyond the bound: nothing learned
BAD_STEP = 2  # the step would take a weight beyond the bound: nothing learned
LEARNED = 3


@_jit
def softmax_row(X, positive, w, row):  # type: ignore[no-untyped-def]
    """``row = float32(X[positive] - softmax(X @ w) @ X)`` (``LearnedBlend.pairs``)."""
    n, f = X.shape
    z = np.empty(n)
    zmax = -np.inf
    nan = False
    for i in range(n):
        s = 0.0
        for j in range(f):
            s += X[i, j] * w[j]
        z[i] = s
        if s > zmax:
            zmax = s
        elif s != s:
            nan = True
    if nan:
        zmax = np.nan
    total = 0.0
    for i in range(n):
        z[i] = math.exp(z[i] - zmax)
        total += z[i]
    mean = np.zeros(f)
    for i in range(n):
        p = z[i] / total
        for j in range(f):
            mean[j] += p * X[i, j]
    for j in range(f):
        row[j] = np.float32(X[positive, j] - mean[j])


@_jit
def usable(row, bound):  # type: ignore[no-untyped-def]
    """Every value finite and at most ``bound`` in size (``blend.usable_rows``)."""
    for v in row.ravel():  # noqa: SIM110 (numba compiles no all() of a generator)
        if not abs(v) <= bound:  # NaN too
            return False
    return True


@_jit
def softmax_step(w, d, lr, l2, bound, out):  # type: ignore[no-untyped-def]
    """``out = w + lr * (d - l2 * w)`` (``w + lr * d`` without l2); False if a weight of
    ``out`` is beyond ``bound`` or not finite (``LearnedBlend.apply_pairs``)."""
    ok = True
    for j in range(len(w)):
        if l2 != 0.0:
            v = w[j] + lr * (np.float64(d[j]) - l2 * w[j])
        else:
            v = w[j] + lr * np.float64(d[j])
        out[j] = v
        if not abs(v) <= bound:
            ok = False
    return ok


@_jit
def softmax_learn(rows, played, X, w, lr, l2, row_bound, weight_bound, row, out):  # type: ignore[no-untyped-def]
    """The learned blend's whole softmax step for one play: find ``played`` among the
    candidate ``rows`` (of feature rows ``X``), build its step row into ``row`` (float32)
    and the stepped weights into ``out``. Returns :data:`LEARNED` or why not."""
    positive = -1
    for i in range(len(rows)):
        if rows[i] == played:
            positive = i
            break
    if positive < 0 or len(rows) < 2:
        return NO_STEP
    softmax_row(X, positive, w, row)
    if not usable(row, row_bound):
        return BAD_ROW
    if not softmax_step(w, row, lr, l2, weight_bound, out):
        return BAD_STEP
    return LEARNED
