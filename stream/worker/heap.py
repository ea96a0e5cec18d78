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

import gc
import time


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
