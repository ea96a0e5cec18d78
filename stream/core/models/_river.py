"""river, imported without ``river.proba`` until something uses it.

Since session 17 the core imports no river model at start-up: the skip model is
:class:`stream.core.models.skip.OnlineLogistic` (river's ``LogisticRegression(SGD)`` step
for step, tested equal to it) and the learned blend is numpy and compiled kernels. The
deferral stays for whatever imports river later (the tests' references, users' own river
models next to the core): ``river.linear_model`` imports every linear model of river, among
them ``BayesianLinearRegression``, whose module does ``from river import base, proba,
utils``; ``river.proba`` imports ``scipy.stats``: ~2 s of CPU at every process start
(``python -X importtime``; 2.5-3 s on the loaded 2-core CI box), for distributions nothing
here uses.

:func:`defer_proba` sets ``river.proba`` to a stand-in module *before* river's linear models
are imported, so that ``from river import proba`` takes the attribute and imports nothing.
The stand-in is not in ``sys.modules`` (the import system and ``inspect.getmodule``, which
Faust's ``app.agent`` calls on every module, never see it), and the first access to any of
its attributes imports the real ``river.proba`` (as usual: the import replaces
``river.proba`` with it) and answers from it. Any other import of ``river.proba`` or its
submodules is an ordinary import. Measured: ``from river import linear_model, optim,
utils`` 3.8 s -> 1.3 s. (``importlib.util.LazyLoader`` was tried first: its module loads on
*any* attribute access, and ``inspect.getmodule`` reads every module's ``__file__``.)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

_NAME = "river.proba"


class _StandIn(types.ModuleType):
    """``river.proba`` until first used: attribute reads import and answer from the real one."""

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module(_NAME), name)


def defer_proba() -> None:
    """Put the stand-in in place (no-op once ``river.proba`` is imported)."""
    if _NAME in sys.modules:
        return
    import river

    if importlib.util.find_spec(_NAME) is None:  # not this river: nothing to defer
        return
    river.proba = _StandIn(_NAME)  # type: ignore[attr-defined]


defer_proba()
