"""Build a large blob from this process's state in a forked child, off the event loop.

A model checkpoint serialises every model (several MB and tens of ms of CPU at 60k plays,
growing with the catalogue and the listeners; see stream.core.checkpoint) and signs it. Done on
the worker's event loop, that was a ~100-150 ms stall every ``checkpoint_interval_s``: the
largest spike in the P2 freshness plot (docs/benchmarks.md, session 8). A thread would not
help: the copy has to be consistent, and the serialisation holds the GIL.

:func:`build_in_child` does what Redis does for BGSAVE: ``fork()`` gives the child a
copy-on-write view of the whole process as it was at that instant (consistent by
construction, and nothing is copied up front); the child runs ``build()``, writes the bytes
to a pipe and exits with ``os._exit`` (no atexit hooks, no finalizers, no event loop). The
parent reads the pipe on its event loop and reaps the child. Its event loop pays for the
``fork()`` call alone (page tables: a few ms for a few hundred MB).

The child runs only ``build()``: it must not touch the event loop, Kafka, Redis or anything
another thread might have held a lock on at the fork (serialising plain model state is fine).
POSIX only: :func:`can_fork` says whether it is available.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
import traceback
from collections.abc import Callable

#: the child runs at this much lower CPU priority than the worker (which keeps serving)
CHILD_NICENESS = 10
#: file descriptors above this are left alone in the child (close_range makes the span cheap)
_MAX_FD = 1 << 20
#: exit status of a child whose ``build()`` raised
_BUILD_FAILED = 3


class ChildBuildError(RuntimeError):
    """The forked child did not deliver its blob (it failed, was killed or timed out)."""


def can_fork() -> bool:
    return hasattr(os, "fork")


def _child(build: Callable[[], bytes], fd: int) -> None:  # pragma: no cover - in the child
    code = _BUILD_FAILED
    try:
        # the parent's handlers (asyncio's, through a wakeup fd) must not run here:
        # a SIGTERM/SIGINT to the process group simply ends the child
        signal.set_wakeup_fd(-1)
        # SIGCONT too: the parent's freeze fence (worker/fencing.py) must not make a child
        # stopped and continued with its process group exit 75 as if it were the worker
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCONT):
            signal.signal(sig, signal.SIG_DFL)
        with contextlib.suppress(OSError):
            os.nice(CHILD_NICENESS)  # the worker's own process comes first for the CPU
        # the worker's sockets (Kafka, Redis, the metrics port) are not the child's: if
        # the worker dies first, they must not stay open (or bound) until the child exits
        os.closerange(3, fd)
        os.closerange(fd + 1, _MAX_FD)
        view = memoryview(build())
        while view:
            view = view[os.write(fd, view) :]
        code = 0
    except BaseException:  # noqa: BLE001 - reported to the parent as the exit status
        code = _BUILD_FAILED
        with contextlib.suppress(BaseException):
            traceback.print_exc()  # into the worker's log (stderr is inherited)
    finally:
        os._exit(code)


async def build_in_child(build: Callable[[], bytes], *, timeout_s: float) -> tuple[bytes, float]:
    """``build()``'s bytes, computed in a forked child. Returns them and the time the
    event loop was held by the fork itself (seconds). Raises :class:`ChildBuildError` if the
    child fails or has not delivered within ``timeout_s`` (it is killed then)."""
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe()
    # No garbage collection on either side while the child lives: a collection writes to
    # every tracked object's header, which would copy (copy-on-write) most of the heap's
    # pages, in the worker just when it should be serving (the child inherits this).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    started = time.perf_counter()
    try:
        pid = os.fork()
    except BaseException:
        os.close(read_fd)
        os.close(write_fd)
        if gc_was_enabled:
            gc.enable()
        raise
    if pid == 0:  # pragma: no cover - the child
        os.close(read_fd)
        _child(build, write_fd)
    paused = time.perf_counter() - started
    try:
        return await _collect(pid, read_fd, write_fd, loop, timeout_s), paused
    finally:
        if gc_was_enabled:
            gc.enable()


async def _collect(
    pid: int, read_fd: int, write_fd: int, loop: asyncio.AbstractEventLoop, timeout_s: float
) -> bytes:
    """The child's bytes from its pipe, then its exit status checked. On any other way
    out (a timeout, a failure, the caller's task cancelled) the child is killed and reaped
    before this returns: no child outlives its checkpoint, none is left a zombie."""
    os.close(write_fd)
    transport: asyncio.BaseTransport | None = None
    delivered = False
    try:
        pipe = os.fdopen(read_fd, "rb", buffering=0)  # owns read_fd from here
        reader = asyncio.StreamReader(limit=2**20)
        try:
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), pipe
            )
        except BaseException:
            pipe.close()
            raise
        try:
            data = await asyncio.wait_for(reader.read(-1), timeout_s)
        except TimeoutError:
            raise ChildBuildError(
                f"snapshot child {pid} did not finish within {timeout_s:g} s"
            ) from None
        delivered = True
    finally:
        if transport is not None:
            transport.close()
        if not delivered:
            _kill_and_reap(pid)  # synchronous: a second cancellation cannot skip it
    status = await _reap(pid)
    if status != 0:
        raise ChildBuildError(f"snapshot child {pid} failed ({_describe(status)})")
    return data


def _kill_and_reap(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)  # returns at once: SIGKILL cannot be caught or delayed


async def _reap(pid: int, timeout_s: float = 10.0) -> int:
    """The child's wait status (it has closed its pipe, so it is exiting; bounded anyway,
    and a cancelled wait kills and reaps it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            return status
        try:
            await asyncio.sleep(0.005)
        except BaseException:
            _kill_and_reap(pid)
            raise


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    code = os.waitstatus_to_exitcode(status)
    return "build() raised" if code == _BUILD_FAILED else f"exit status {code}"
