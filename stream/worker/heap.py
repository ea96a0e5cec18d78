"""Keeping Python's cyclic garbage collector off the worker's long-lived objects.

Python's full (generation 2) collections walk every tracked object alive: fed at 1,000
events/s each one held the event loop ~120-160 ms (the freshness p99) with the start-up
heap alone, and the state of every listener ever seen (the session table) makes it seconds
at a million listeners. Frozen objects are not walked; they are still freed by reference
counting when dropped (a forgotten or expired listener). Only a reference *cycle* that dies
after being frozen is never reclaimed, and the worker's long-lived objects do not form such
cycles in steady state (docs/benchmarks.md, session 6 and "Memory under hostile ids").
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
import time

logger = logging.getLogger(__name__)

#: linux/prctl.h
_PR_SET_THP_DISABLE = 41


def freeze_startup_heap() -> int:
    """Collect the young generations, then move every object alive now (modules, Faust,
    numba, the warmed-up kernels, restored models) out of the collector's reach; returns
    how many. After the freeze, full collections took 7-11 ms instead of 120-160 ms.

    Not a full collection first: at this point one walks ~200k objects to find a handful of
    unreachable ones (7 after the imports and the kernel warm-up), and took 0.4-0.7 s of
    every (re)start on the loaded CI box (the recovery drill, issue #18 item 4)."""
    gc.collect(1)
    gc.freeze()
    return gc.get_freeze_count()


def freeze_survivors() -> float:
    """Collect the young generations (cheap: only objects created since the last
    collection of them), then freeze every object alive (O(1): the generations' lists are
    moved, not walked). Returns the seconds it took. (It does not count the frozen objects:
    ``gc.get_freeze_count()`` walks them all -- ~0.7 s at a million listeners.)"""
    started = time.perf_counter()
    gc.collect(1)
    gc.freeze()
    return time.perf_counter() - started


def no_transparent_huge_pages() -> bool:
    """Stop numpy from asking the kernel for transparent huge pages (``madvise
    MADV_HUGEPAGE`` on every array of 4 MiB or more) in this process, unless the operator
    set ``NUMPY_MADVISE_HUGEPAGE`` themselves; returns whether numpy asks for them now.

    The worker's per-track arrays are reserved for ``max_tracks`` rows and mapped lazily
    (:func:`stream.core.models._vocab.reserve_rows`), so learning a new track writes into a
    page nobody touched yet. With huge pages each 2 MiB (16,384 MF rows) was faulted in at
    once on the event loop: 20-104 ms per fault in-process on this VM (33 of them up to
    500k tracks), most likely the 578 ms ``ImplicitMF._sync`` stall of session 13's drill
    (docs/benchmarks.md, "The junk-ids drill, session 14"). With 4 KiB pages the same rows
    cost microseconds per page, and the MF scans ran no slower. Arrays allocated before the
    call keep their advice; call it before the first play."""
    import numpy as np

    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:  # the operator's choice, applied by numpy
        return bool(int(os.environ["NUMPY_MADVISE_HUGEPAGE"] or 0))
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    set_advice = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    if set_advice is None:  # numpy's private switch (tested with numpy 2.x) is gone: loudly
        raise RuntimeError(
            "numpy._core.multiarray._set_madvise_hugepage not found in numpy "
            f"{np.__version__}: the worker cannot turn numpy's transparent huge page advice "
            "off (a 2 MiB page fault per 16,384 new tracks on the event loop); set "
            "NUMPY_MADVISE_HUGEPAGE=0 in the worker's environment (or =1 to keep the advice)")
    set_advice(False)
    _no_thp_for_this_process()
    return False


def _no_thp_for_this_process() -> bool:
    """``prctl(PR_SET_THP_DISABLE)``: no transparent huge pages for this process whatever
    the host's mode (``enabled=always`` backs large anonymous mappings with huge pages
    without any advice); inherited by forked children. Returns whether it took effect
    (a warning otherwise: not Linux, or a kernel without it)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0:
            return True
        reason = os.strerror(ctypes.get_errno())
    except (OSError, AttributeError) as exc:
        reason = str(exc)
    logger.warning("prctl(PR_SET_THP_DISABLE) failed (%s): with the host's transparent huge "
                   "pages set to 'always', new per-track rows may fault 2 MiB at a time", reason)
    return False


#: environment variables with which an operator chooses BLAS threads themselves
_BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def one_blas_thread() -> int | None:
    """Run numpy's BLAS on the calling thread only, unless the operator set one of
    :data:`_BLAS_THREAD_VARS`; returns the limit applied (None: the operator's choice).

    The worker's one BLAS call of size is "more like this" (every item factor against one:
    a 500k x 32 matrix-vector product at the track cap). OpenBLAS splits it over every core
    and its threads spin while they wait for each other, so on a busy 2-core box the
    event loop's own CPU for one list reached 40-50 ms, once 273 ms; with one thread its
    worst case in the same check was 5.5 ms against 7.2-13.9 ms (docs/benchmarks.md, "Loop
    stalls, session 16"). The worker runs one event loop: BLAS threads only compete with it."""
    chosen = [name for name in _BLAS_THREAD_VARS if name in os.environ]
    if chosen:
        logger.info("BLAS threads: as the environment says (%s)", ", ".join(chosen))
        return None
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
    logger.info("BLAS threads: 1 (set OPENBLAS_NUM_THREADS to choose)")
    return 1
