"""The runnable examples in the pure modules' docstrings stay true."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "stream.core.events",
    "stream.core.session",
    "stream.config",
    "stream.processing.control",
    "stream.core.checkpoint",
    "stream.core.recommender",
    "stream.core.catalog",
    "stream.core.ranking",
    "stream.processing.documents",
    "stream.processing.pacing",
    "stream.processing.fence",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
