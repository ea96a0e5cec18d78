"""`stream top` in a real terminal: a tmux session runs it against a live worker, and the
screen it draws (tmux capture-pane) shows that worker's live numbers."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from stream.config import Settings
from stream.core.events import PlayEvent

from .conftest import produce, wait_until

pytestmark = pytest.mark.integration


def test_stream_top_draws_live_metrics_in_a_terminal(settings: Settings, worker_factory) -> None:
    tmux = shutil.which("tmux")
    assert tmux, "tmux is needed for this test: scripts/setup.sh installs it"
    worker = worker_factory()
    now = int(time.time() * 1000)
    plays = [PlayEvent(f"u{i % 7}", f"t{i % 23}", now + i, 200_000, f"e{i}") for i in range(321)]
    produce(settings, plays)
    wait_until(lambda: worker.metric_value("stream_events_total") >= len(plays), 60,
               what="plays applied")
    server = f"stream-top-{uuid.uuid4().hex[:8]}"  # a private tmux server
    cmd = f"{sys.executable} -m stream.tools.cli top --url {worker.metrics_url} --interval 0.5"
    subprocess.run([tmux, "-L", server, "new-session", "-d", "-s", "top", "-x", "150", "-y",
                    "45", cmd], check=True, timeout=30)
    try:
        def screen() -> str:
            out = subprocess.run([tmux, "-L", server, "capture-pane", "-p", "-t", "top"],
                                 capture_output=True, text=True, timeout=10)
            return out.stdout

        text = wait_until(lambda: (s := screen()) and "(321)" in s and s, 60,
                          what="stream top showing the 321 processed plays")
        assert f"worker {settings.app_id}" in text
        assert re.search(r"freshness\s+\S+", text)
        assert "cannot read metrics" not in text
        # it keeps redrawing: the clock in the header moves
        first = re.search(r"\d\d:\d\d:\d\d", text)
        assert first
        wait_until(lambda: (m := re.search(r"\d\d:\d\d:\d\d", screen())) and
                   m.group() != first.group(), 60, what="a redraw")
    finally:
        subprocess.run([tmux, "-L", server, "kill-server"], timeout=10, check=False)
