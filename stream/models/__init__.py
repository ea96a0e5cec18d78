"""Online models for the recommender, one per file, sharing :mod:`stream.models.base`."""

from __future__ import annotations

from stream.models.base import CandidateSource, Interaction, OnlineModel, clone, get_params
from stream.models.cooccurrence import SessionCooccurrence
from stream.models.drift import SkipRateDrift
from stream.models.factorization import ImplicitMF
from stream.models.popularity import DecayedPopularity
from stream.models.skip import SkipClassifier

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
