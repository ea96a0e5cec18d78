"""Shared test helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.tools.datasets import default_datasets_dir


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    d = default_datasets_dir()
    if not (d / "lastfm-1k-sample").is_dir():
        pytest.fail(f"real datasets not found at {d} (set STREAM_DATASETS_DIR)")
    return d
