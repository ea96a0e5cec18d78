"""What the worker's start-up leaves out to restart fast (issue #18 item 4, docs/drills):
Faust's fixed table-manager sleep, topic declarations a restart does not need, and the
import of ``scipy.stats`` through ``river.proba``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream.config import load_settings
from stream.faustx.app import create_app
from stream.faustx.startup import QuickTableManager, declare_nothing, declared_topics

ROOT = Path(__file__).resolve().parents[2]


def _app():  # type: ignore[no-untyped-def]
    return create_app(load_settings(env={}, file=None, app_id="startup-app"), partitions=4)


def test_the_app_lists_the_topics_faust_would_declare() -> None:
    app = _app()
    app.batched_table("sessions", default=None, partitions=4)
    assert declared_topics(app) == ["startup-app-__assignor-__leader",
                                    "startup-app-sessions-changelog"]
    # the leader topic's name is the one Faust's own assignor uses
    assert declared_topics(app)[0] == app._leader_assignor._leader_topic_name
    declare_nothing(app)  # before anything read the setting, as in the worker
    assert not app.conf.topic_allow_declare


def test_the_table_manager_starts_without_faust_s_one_second_sleep() -> None:
    app = _app()
    declare_nothing(app)  # a restart: every internal topic exists
    assert isinstance(app.tables, QuickTableManager)
    calls: list[str] = []

    async def channels() -> None:
        calls.append("channels")

    class FakeRecovery:
        async def start(self) -> None:
            calls.append("recovery")

    app.tables._update_channels = channels  # type: ignore[method-assign]
    app.tables._recovery = FakeRecovery()  # type: ignore[assignment]

    async def run() -> float:
        started = time.monotonic()
        await app.tables.on_start()
        return time.monotonic() - started

    took = asyncio.run(run())
    assert calls == ["channels", "recovery"]
    assert took < 0.5  # Faust's own on_start sleeps 1.0 s first


def test_a_first_start_keeps_faust_s_pause_before_the_tables_start() -> None:
    """Topics are declared (a first start): the new changelog must reach the metadata before
    the first play, or Faust rejects plays with PartitionsMismatch (seen in CI)."""
    app = _app()
    assert app.conf.topic_allow_declare
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def nothing() -> None:
        return None

    class FakeRecovery:
        async def start(self) -> None:
            return None

    app.tables.sleep = sleep  # type: ignore[method-assign,assignment]
    app.tables._update_channels = nothing  # type: ignore[method-assign]
    app.tables._recovery = FakeRecovery()  # type: ignore[assignment]
    asyncio.run(app.tables.on_start())
    assert slept == [1.0]


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("probe", ["inspect.getmodule(create_worker)", "pass"])
def test_the_worker_imports_no_scipy_stats_until_river_proba_is_used(probe: str) -> None:
    # inspect.getmodule reads every module's __file__ (Faust's app.agent calls it)
    out = _python(
        "import inspect, sys\n"
        "from stream.worker.app import create_worker\n"
        f"{probe}\n"
        "print('before', 'scipy.stats' in sys.modules)\n"
        "from river import proba\n"
        "import river.proba.gaussian as g\n"
        "print('loaded', proba.Gaussian is g.Gaussian, 'scipy.stats' in sys.modules)\n"
        "from river.linear_model import BayesianLinearRegression as B\n"
        "m = B(); m.learn_one({'a': 1.0}, 2.0)\n"
        "print('used', type(m.predict_one({'a': 1.0}, with_dist=True)).__name__)\n"
    )
    assert out.split("\n")[:3] == ["before False", "loaded True True", "used Gaussian"]
