"""The protocol every online model in :mod:`stream.core.models` follows.

Models look like river estimators: constructor arguments are stored unchanged under the same
names, learned state lives in attributes, randomness comes from an explicit ``seed``, bad
arguments raise :class:`ValueError` in ``__init__``, and time is the event's time carried by
the :class:`Interaction` -- never the wall clock.

Every model implements ``learn_one(x)`` and ``predict_one(x) -> float``. Models that can
propose tracks (:class:`CandidateSource`) also implement ``candidates(x, n)`` and
``score_many(x, track_ids)``; the ranker blends those.

Checkpoints: every model also implements ``export_state() -> (manifest, arrays)`` (a
JSON-able manifest of str/int/float/bool/None/list/dict, and numeric numpy arrays: bool,
integer or float dtypes, never object) and the classmethod ``import_state(manifest,
arrays, ...)``, which checks every field (type, dtype, shape, range, id length) with the
helpers of :mod:`stream.core.models._state` and raises ``ValueError`` naming the bad one
(all but the blend share that plumbing: ``_state.StateModel``, ``_vocab.VocabularyModel``). A
restored model must behave exactly like the exported one (tests/unit/test_models_contract.py
checks both for every model). Models that index tracks through a shared vocabulary take it
as ``import_state(..., vocabulary=...)``; lists of ids travel as
:func:`stream.core.models._state.encode_strings` arrays.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Interaction:
    """One (listener, track) pair with its context: what models learn from and score.

    ``history`` is the listener's recent tracks before this one, oldest first. For scoring,
    ``track_id`` may be empty (a query for candidates) and ``skipped`` is ignored.
    ``features`` carries scores other models computed (e.g. ``mf``, ``popularity``) so a
    model such as the skip classifier can use them without knowing those models.
    """

    user_id: str
    track_id: str = ""
    ts_ms: int = 0
    skipped: bool = False
    history: tuple[str, ...] = ()
    session_position: int = 0
    recent_skip_rate: float = 0.25
    context: str | None = None
    artist_id: str | None = None
    features: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class OnlineModel(Protocol):
    """Anything that learns from one interaction at a time and scores one."""

    seed: int

    def learn_one(self, x: Interaction) -> None: ...

    def predict_one(self, x: Interaction) -> float: ...


@runtime_checkable
class CandidateSource(OnlineModel, Protocol):
    """A model that can also propose and score tracks for a query in bulk."""

    def candidates(self, x: Interaction, n: int) -> dict[str, float]: ...

    def score_many(self, x: Interaction, track_ids: Sequence[str]) -> FloatArray: ...


def get_params(model: object) -> dict[str, Any]:
    """The constructor arguments of ``model``, read back from its attributes (river style)."""
    sig = inspect.signature(type(model).__init__)
    return {name: getattr(model, name) for name in sig.parameters if name != "self"}


def clone(model: Any) -> Any:
    """A fresh, unfitted copy of ``model`` with the same parameters."""
    return type(model)(**get_params(model))


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ValueError unless ``value`` is > 0 (or >= 0 with ``allow_zero``)."""
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def check_fraction(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ValueError unless ``value`` is in (0, 1] (or [0, 1] with ``allow_zero``)."""
    lo_ok = value >= 0 if allow_zero else value > 0
    if not (lo_ok and value <= 1):
        lo = "[0" if allow_zero else "(0"
        raise ValueError(f"{name} must be in {lo}, 1], got {value!r}")
