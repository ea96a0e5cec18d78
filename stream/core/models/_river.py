"""river, imported without ``river.proba`` until something uses it.

``river.linear_model`` (the skip model's and the learned blend's logistic regressions)
imports every linear model of river, among them ``BayesianLinearRegression``, whose module
imports ``river.proba``, which imports ``scipy.stats``: ~2 s of CPU at every process start
(``python -X importtime``; 2.5-3 s on the loaded 2-core CI box), for distributions nothing
here uses. :func:`defer_proba` registers ``river.proba`` as a lazily loaded module
(:class:`importlib.util.LazyLoader`) before river's linear models are imported: the module
runs (and imports scipy) on its first attribute access, so anything that does use it gets
the real module. Measured: ``from river import linear_model, optim, utils`` 3.8 s -> 1.3 s.
"""

from __future__ import annotations

import importlib.util
import sys

_LAZY = "river.proba"


def defer_proba() -> None:
    """Make ``river.proba`` load on first use (no-op once it is imported or registered)."""
    if _LAZY in sys.modules:
        return
    import river

    spec = importlib.util.find_spec(_LAZY)
    if spec is None or spec.loader is None:  # not this river: import as usual
        return
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[_LAZY] = module
    loader.exec_module(module)
    # set on the parent too: ``from river import proba`` then takes the attribute without
    # the import system reading the module's ``__spec__`` (which would load it)
    river.proba = module  # type: ignore[attr-defined]


defer_proba()
