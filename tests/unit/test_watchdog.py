import asyncio
import logging
import time

import pytest

from stream.worker.watchdog import LoopLagProbe, StallWatch, describe_tasks


def test_idle_without_lag_is_not_a_stall() -> None:
    watch = StallWatch(after_s=10.0)
    assert not watch.check(0.0, lag=0)
    assert not watch.check(100.0, lag=0)  # quiet topic for minutes: fine
    assert watch.episodes == 0


def test_lag_without_progress_is_reported_once_per_episode(caplog) -> None:
    watch = StallWatch(after_s=10.0, describe_state=lambda: {"paused": ["plays[0]"]})
    watch.progress(0.0)
    with caplog.at_level(logging.WARNING, logger="stream.worker.watchdog"):
        assert not watch.check(5.0, lag=40)  # not yet
        assert watch.check(11.0, lag=40)  # stalled: logged
        assert not watch.check(20.0, lag=40)  # same episode: not again
        watch.progress(21.0)  # resumes
        assert not watch.check(25.0, lag=40)
        assert watch.check(32.0, lag=40)  # a second episode
    assert watch.episodes == 2
    stalls = [r for r in caplog.records if "stream stalled" in r.getMessage()]
    assert len(stalls) == 2
    assert "plays[0]" in stalls[0].getMessage()
    assert any("resumed" in r.getMessage() for r in caplog.records)


def test_the_clock_starts_when_lag_appears() -> None:
    watch = StallWatch(after_s=10.0)
    assert not watch.check(0.0, lag=0)
    assert not watch.check(50.0, lag=0)
    assert not watch.check(55.0, lag=3)  # 5 s after the last lag-free check
    assert watch.check(61.0, lag=3)


def test_a_failing_state_description_does_not_raise(caplog) -> None:
    def broken() -> dict:
        raise RuntimeError("consumer gone")

    watch = StallWatch(after_s=1.0, describe_state=broken)
    watch.progress(0.0)
    with caplog.at_level(logging.WARNING, logger="stream.worker.watchdog"):
        assert watch.check(2.0, lag=1)
    assert "consumer gone" in caplog.text


def test_bad_threshold_is_rejected() -> None:
    with pytest.raises(ValueError, match="after_s"):
        StallWatch(after_s=0)


def test_describe_tasks_shows_where_a_task_waits() -> None:
    async def blocked_on_commit(gate: asyncio.Event) -> None:
        await gate.wait()

    async def main() -> str:
        gate = asyncio.Event()
        task = asyncio.create_task(blocked_on_commit(gate), name="fetcher")
        await asyncio.sleep(0)
        text = describe_tasks()
        gate.set()
        await task
        return text

    text = asyncio.run(main())
    line = next(x for x in text.splitlines() if x.startswith("task fetcher "))
    assert line.endswith("blocked_on_commit")
    assert "test_watchdog.py" in text  # the frame it is suspended in


def test_loop_lag_probe_sees_a_blocking_callback() -> None:
    seen: list[float] = []
    probe = LoopLagProbe(on_lag=seen.append, interval_s=0.005)

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(probe.run())
        await asyncio.sleep(0.05)
        quiet = probe.max_lag
        time.sleep(0.12)  # hold the loop
        await asyncio.sleep(0.03)
        task.cancel()
        assert quiet < 0.1

    asyncio.run(main())
    assert probe.samples == len(seen) > 5
    assert 0.12 - 0.005 - 0.01 <= probe.max_lag == max(seen) < 0.5


def test_loop_busy_counts_the_loop_threads_cpu_not_its_waiting() -> None:
    """A callback that burns ~80 ms of CPU shows as busy time; one that sleeps 150 ms (the
    thread not running, as when the machine's other processes have the CPU) shows as lag
    but not as busy time."""
    busy: list[float] = []
    probe = LoopLagProbe(on_lag=lambda s: None, interval_s=0.005, on_busy=busy.append)

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(probe.run())
        await asyncio.sleep(0.03)
        time.sleep(0.15)  # held, but not by CPU work
        await asyncio.sleep(0.03)
        waited = probe.max_busy
        burn(0.08)
        await asyncio.sleep(0.03)
        task.cancel()
        assert probe.max_lag >= 0.13
        assert waited < 0.05

    asyncio.run(main())
    assert 0.08 <= probe.max_busy == max(busy) < 0.5


def test_the_stall_sampler_says_where_the_loop_was_held() -> None:
    """The junk-ids drill found its loop stalls with this: a callback that holds the loop
    ~300 ms is reported as one episode whose most frequent stack names it."""
    import asyncio
    import time

    from stream.worker.watchdog import LoopLagProbe, StallSampler

    sampler = StallSampler(threshold_s=0.1, interval_s=0.005, min_gap_s=0.0)

    def hold_the_loop_for_a_while() -> None:
        time.sleep(0.3)  # a blocking call on the event loop

    async def go() -> None:
        probe = LoopLagProbe(on_lag=lambda s: None, sampler=sampler)
        task = asyncio.get_running_loop().create_task(probe.run())
        await asyncio.sleep(0.05)
        hold_the_loop_for_a_while()
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(go())
    assert len(sampler.episodes) == 1
    seconds, stack = sampler.episodes[0]
    assert 0.2 <= seconds <= 1.0
    assert stack.startswith("test_watchdog.py") and "hold_the_loop_for_a_while" in stack
    assert sampler.last_episode is not None and sampler.last_episode[1] < 0.1  # slept


def test_the_stall_sampler_tells_the_loops_own_work_from_not_running() -> None:
    import asyncio

    from stream.worker.watchdog import LoopLagProbe, StallSampler

    sampler = StallSampler(threshold_s=0.1, interval_s=0.005, min_gap_s=0.0)

    async def go() -> None:
        probe = LoopLagProbe(on_lag=lambda s: None, sampler=sampler)
        task = asyncio.get_running_loop().create_task(probe.run())
        await asyncio.sleep(0.05)
        burn(0.25)
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(go())
    assert sampler.last_episode is not None
    seconds, cpu = sampler.last_episode
    assert 0.25 <= cpu <= seconds + 0.02


def test_the_stall_sampler_logs_every_episode_of_own_work_over_always_cpu_s() -> None:
    """Within ``min_gap_s`` of a logged episode, one of sleeping is not logged, one with
    ``always_cpu_s`` of the loop's own work is (a 79 ms turn of the 1M drill had no line)."""
    import asyncio
    import logging
    import time

    from stream.worker.watchdog import LoopLagProbe, StallSampler

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    log = logging.getLogger("test-stall-sampler-always")
    log.addHandler(Keep())
    log.propagate = False
    sampler = StallSampler(threshold_s=0.05, interval_s=0.005, min_gap_s=100.0, log=log,
                           always_cpu_s=0.1)

    async def go() -> None:
        probe = LoopLagProbe(on_lag=lambda s: None, sampler=sampler)
        task = asyncio.get_running_loop().create_task(probe.run())
        await asyncio.sleep(0.05)
        time.sleep(0.12)  # logged: the first episode
        await asyncio.sleep(0.1)
        time.sleep(0.12)  # not logged: within min_gap_s, no own work
        await asyncio.sleep(0.1)
        burn(0.15)  # logged all the same: 150 ms of own CPU
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(go())
    assert len(sampler.episodes) == 3
    assert len(lines) == 2 and "burn" in lines[1], lines


def burn(seconds: float) -> None:
    """Hold the calling thread busy for ``seconds`` of its own CPU (the loop's own work)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
