"""stream.forksnap: a blob built in a forked child (real fork(), real pipe)."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time

import pytest

from stream.forksnap import ChildBuildError, build_in_child, can_fork
from tests.procfs import child_states

pytestmark = pytest.mark.skipif(not can_fork(), reason="POSIX fork() only")


def children() -> set[str]:
    """This process's children as ``pid:state`` (other tests' services too)."""
    return {f"{pid}:{state}" for pid, state in child_states(os.getpid()).items()}


def test_the_child_returns_a_large_blob_intact() -> None:
    payload = os.urandom(5 * 2**20)  # several pipe buffers' worth
    data, paused = asyncio.run(build_in_child(lambda: payload, timeout_s=30))
    assert data == payload
    assert 0 <= paused < 5


def test_the_child_sees_the_state_as_it_was_at_the_fork() -> None:
    state = {"plays": 1}

    def build() -> bytes:
        time.sleep(0.3)  # the parent changes its state meanwhile
        return json.dumps(state).encode()

    async def main() -> bytes:
        task = asyncio.ensure_future(build_in_child(build, timeout_s=30))
        await asyncio.sleep(0.1)  # the fork has happened: the child has its own copy
        state["plays"] = 2
        data, _ = await task
        return data

    assert json.loads(asyncio.run(main())) == {"plays": 1}
    assert state == {"plays": 2}


def test_the_event_loop_keeps_running_while_the_child_works() -> None:
    async def main() -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        child = asyncio.ensure_future(
            build_in_child(lambda: (time.sleep(0.5), b"x")[1], timeout_s=30)
        )
        await asyncio.sleep(0.1)
        collecting_meanwhile.append(gc.isenabled())
        await child
        ticker.cancel()
        return ticks

    collecting_meanwhile: list[bool] = []
    assert gc.isenabled()
    assert asyncio.run(main()) >= 20  # ~50 ticks in 0.5 s when nothing blocks the loop
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
        task = asyncio.ensure_future(build_in_child(lambda: (time.sleep(30), b"")[1], timeout_s=60))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - started

    assert asyncio.run(main()) < 2.0
    assert children() <= before
    assert gc.isenabled()
