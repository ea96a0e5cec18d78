""" "More like this" lists per track are kept fresh in Redis by the worker."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from stream.adapters.redis_store import RecoReader
from stream.config import Settings
from stream.tools.datasets import load_events

from .conftest import produce, settings_env, wait_until

pytestmark = pytest.mark.integration


def test_similar_lists_for_played_tracks(
    settings: Settings, worker_factory, reader: RecoReader, datasets_dir: Path
) -> None:
    events = load_events(datasets_dir / "lastfm-1k-sample", "lastfm")[:2000]
    worker_factory()
    produce(settings, events)
    top_track = Counter(e.track_id for e in events).most_common(1)[0][0]
    doc = wait_until(lambda: reader.similar(top_track), 60, what="similar list of a hot track")
    assert doc["track_id"] == top_track
    items = doc["items"]
    assert 0 < len(items) <= settings.top_k
    assert top_track not in {i["track_id"] for i in items}
    assert all(i["reason"] for i in items)
    assert reader.client.ttl(f"{settings.similar_prefix}{top_track}") > 0

    env = settings_env(settings) | {"PATH": os.environ["PATH"]}
    out = subprocess.run(
        [sys.executable, "-m", "stream.tools.cli", "similar", top_track],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    # names and artists when known (Last.fm plays carry them), the id otherwise
    assert (items[0].get("name") or items[0]["track_id"]) in out.stdout
