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
