"""stream.worker.snapshot: a blob built in a forked child (real fork(), real pipe)."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from pathlib import Path

import pytest

from stream.worker.snapshot import ChildBuildError, build_in_child, can_fork
from tests.procfs import child_states
from tests.procfs import children as procfs_children

pytestmark = pytest.mark.skipif(not can_fork(), reason="POSIX fork() only")


def children() -> set[str]:
    """This process's children as ``pid:state`` (other tests' services too)."""
    return {f"{pid}:{state}" for pid, state in child_states(os.getpid()).items()}


def test_the_child_returns_a_large_blob_intact() -> None:
    payload = os.urandom(5 * 2**20)  # several pipe buffers' worth
    data, paused = asyncio.run(build_in_child(lambda: payload, timeout_s=30))
    assert data == payload
    assert 0 <= paused < 5


def wait_for_file(path: Path, timeout_s: float = 30.0) -> bool:
    """In a child: wait (bounded) until the parent creates ``path``."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


async def new_child(before: set[int], timeout_s: float = 30.0) -> int:
    """Wait (bounded, without blocking the loop) until this process has a child not in
    ``before``: the fork has happened."""
    deadline = time.monotonic() + timeout_s
    while not (new := procfs_children(os.getpid()) - before):
        assert time.monotonic() < deadline, "no child was forked"
        await asyncio.sleep(0.005)
    return min(new)


def test_the_child_sees_the_state_as_it_was_at_the_fork(tmp_path: Path) -> None:
    state = {"plays": 1}
    changed = tmp_path / "parent-changed-its-state"

    def build() -> bytes:
        assert wait_for_file(changed)  # the parent changes its state meanwhile
        return json.dumps(state).encode()

    async def main() -> bytes:
        before = procfs_children(os.getpid())
        task = asyncio.ensure_future(build_in_child(build, timeout_s=60))
        await new_child(before)  # the fork has happened: the child has its own copy
        state["plays"] = 2
        changed.touch()
        data, _ = await task
        return data

    assert json.loads(asyncio.run(main())) == {"plays": 1}
    assert state == {"plays": 2}


def test_the_event_loop_keeps_running_while_the_child_works(tmp_path: Path) -> None:
    """The child finishes only once the parent's loop has ticked 20 times: if the build
    held the loop (built in-process, or waited on synchronously), it would never see them
    and would give up after 30 s."""
    ticked = tmp_path / "parent-ticked"

    async def main() -> tuple[bytes, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1
                if ticks == 20:
                    ticked.touch()

        before = procfs_children(os.getpid())
        ticker = asyncio.ensure_future(tick())
        child = asyncio.ensure_future(
            build_in_child(lambda: b"ok" if wait_for_file(ticked) else b"timeout",
                           timeout_s=60)
        )
        await new_child(before)
        collecting_meanwhile.append(gc.isenabled())
        data, _ = await child
        ticker.cancel()
        return data, ticks

    collecting_meanwhile: list[bool] = []
    assert gc.isenabled()
    data, ticks = asyncio.run(main())
    assert data == b"ok" and ticks >= 20
    # no garbage collection while the child lives (it would copy the heap's pages), and
    # collection is back on afterwards
    assert collecting_meanwhile == [False]
    assert gc.isenabled()


def test_a_failing_build_raises_and_leaves_no_child() -> None:
    def build() -> bytes:
        raise ValueError("no model")

    before = children()
    with pytest.raises(ChildBuildError, match="build\\(\\) raised"):
        asyncio.run(build_in_child(build, timeout_s=30))
    assert children() <= before  # reaped: no new child, not even a zombie


def test_a_hanging_child_is_killed_at_the_timeout() -> None:
    before = children()
    started = time.monotonic()
    with pytest.raises(ChildBuildError, match="did not finish within 0.5 s"):
        asyncio.run(build_in_child(lambda: (time.sleep(60), b"")[1], timeout_s=0.5))
    assert time.monotonic() - started < 10
    assert children() <= before
    assert gc.isenabled()


def test_the_child_holds_none_of_the_parents_sockets() -> None:
    """Only the pipe: a worker's Kafka, Redis and metrics sockets must not outlive it."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        fd = listener.fileno()

        def build() -> bytes:
            try:
                os.fstat(fd)
            except OSError:
                return b"closed"
            return b"open"

        data, _ = asyncio.run(build_in_child(build, timeout_s=30))
        assert data == b"closed"
        os.fstat(fd)  # the parent's own socket is untouched
    finally:
        listener.close()


def test_a_cancelled_build_kills_and_reaps_its_child_at_once() -> None:
    """A checkpoint task cancelled mid-build (e.g. the loop tearing down) takes its child
    with it: no waiting for the build, no child left running, no zombie."""
    before = children()

    async def main() -> float:
        pids = procfs_children(os.getpid())
        task = asyncio.ensure_future(build_in_child(lambda: (time.sleep(60), b"")[1], timeout_s=90))
        await new_child(pids)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - started

    # "at once": nowhere near the 60 s the build would take (bound generous for a loaded box)
    assert asyncio.run(main()) < 20.0
    assert children() <= before
    assert gc.isenabled()
