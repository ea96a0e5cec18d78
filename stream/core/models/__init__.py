"""Online models for the recommender, one per file, sharing :mod:`stream.core.models.base`."""

from __future__ import annotations

# first: river's linear models without scipy.stats (stream.core.models._river)
import stream.core.models._river  # noqa: F401, I001
from stream.core.models.base import CandidateSource, Interaction, OnlineModel, clone, get_params
from stream.core.models.cooccurrence import SessionCooccurrence
from stream.core.models.drift import SkipRateDrift
from stream.core.models.factorization import ImplicitMF
from stream.core.models.popularity import DecayedPopularity
from stream.core.models.skip import SkipClassifier

__all__ = [
    "CandidateSource",
    "DecayedPopularity",
    "ImplicitMF",
    "Interaction",
    "OnlineModel",
    "SessionCooccurrence",
    "SkipClassifier",
    "SkipRateDrift",
    "clone",
    "get_params",
]
