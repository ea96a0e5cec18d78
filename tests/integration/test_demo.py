"""`stream demo` (what `make demo` runs) ends with named, personal lists for three real
listeners and leaves a live worker behind, which `stream stack down` would stop."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request

import pytest

from stream.adapters.redis_store import RecoReader
from stream.config import Settings
from stream.tools import stack

from .conftest import settings_env

pytestmark = pytest.mark.integration


def test_demo_leaves_a_live_worker_and_prints_named_lists(
    settings: Settings, reader: RecoReader, stack_config: stack.StackConfig
) -> None:
    env = settings_env(settings) | {"PATH": os.environ["PATH"]}
    env["STREAM_STATE_DIR"] = str(stack_config.state_dir)
    # the stack's ports too (a private stack: STREAM_STACK_*_PORT), or its `stack up` waits
    # for a broker on the default port
    env |= {k: v for k, v in os.environ.items() if k.startswith("STREAM_STACK_")}
    try:
        out = subprocess.run(
            [sys.executable, "-m", "stream.tools.cli", "demo", "--count", "3000", "--rate", "1000"],
            env=env, capture_output=True, text=True, timeout=400,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        text = out.stdout
        assert "replayed 3000 real movielens plays; the worker applied 3000" in text
        blocks = re.findall(r"\[demo\] listener (\S+) \((\d+) plays\):\n((?:  .*\n)+)", text)
        assert len(blocks) == 3, text[-3000:]
        lists = []
        for user, _, lines in blocks:
            doc = reader.get(user)
            assert doc is not None and len(doc.items) == settings.top_k
            # every line shows the title (MovieLens titles from ml-100k.item), never the id
            assert [i.name for i in doc.items] and all(i.name for i in doc.items)
            for item in doc.items:
                assert item.name is not None and item.name[:60] in lines
            lists.append(tuple(i.track_id for i in doc.items))
        assert len(set(lists)) == 3, "personal lists differ between listeners"
        # the worker stays up, detached, and its metrics answer
        pid = stack.worker_pid(stack_config)
        assert pid is not None, "the demo worker should keep running"
        with urllib.request.urlopen(
            f"http://127.0.0.1:{settings.metrics_port}/metrics", timeout=5
        ) as resp:
            assert b"stream_events_total" in resp.read()
        for command in ("stream top", f"stream recs {blocks[0][0]}", "stream similar ",
                        "/graph?g0.expr=", "stream stack down"):
            assert command in text
    finally:
        stack.stop_worker(stack_config)  # by its PID file only
        app = re.search(r"app id (demo-[\d-]+),", out.stdout if "out" in locals() else "")
        if app:  # the demo's model checkpoint (it names its own app id per run)
            reader.client.delete(f"model:{app.group(1)}")
    assert stack.worker_pid(stack_config) is None
