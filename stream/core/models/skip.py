"""Skip model: the probability that a listener skips a track, from session and context
features, learned online with a logistic regression (:class:`OnlineLogistic`: river's
``LogisticRegression`` with ``SGD``, step for step, without its per-call machinery).

Linear was chosen by measurement: ~10 us per learn+predict here versus ~1 ms per event for a
forest ensemble, and its weights let the ranker score a whole candidate set with numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import Any

import numpy as np

from stream.core.contexts import CONTEXTS, fold_context
from stream.core.models._state import (
    ID_LEN,
    StateModel,
    decode_strings,
    encode_strings,
    get_array,
    get_field,
    unique_ids,
)
from stream.core.models.base import FloatArray, Interaction, check_positive

#: Scores other models put in ``Interaction.features`` that the skip model uses.
TRACK_FEATURES = ("popularity", "mf", "cooccurrence")

_DAY_MS = 24 * 3600 * 1000
#: the longest feature name a checkpoint may hold ("context=" and a context value)
_FEATURE_LEN = ID_LEN + 16

#: feature name per folded context (built once: no string formatting per event)
_CONTEXT_FEATURE = {c: f"context={c}" for c in CONTEXTS}
#: every feature name the model can learn (a closed set: signals are checked against it)
FEATURE_NAMES = frozenset({"position", "recent_skip_rate", "hour_sin", "hour_cos",
                           *TRACK_FEATURES, *_CONTEXT_FEATURE.values()})


def _context_features(ts_ms: int, session_position: int, recent_skip_rate: float,
                      context: str | None) -> dict[str, float]:
    """:meth:`SkipClassifier.context_features` from the fields it reads."""
    angle = 2 * math.pi * ((ts_ms % _DAY_MS) / _DAY_MS)
    feats = {
        "position": math.log1p(max(session_position, 0)) / 4.0,
        "recent_skip_rate": recent_skip_rate,
        "hour_sin": math.sin(angle),
        "hour_cos": math.cos(angle),
    }
    if context:
        feats[_CONTEXT_FEATURE[fold_context(context)]] = 1.0
    return feats


def _squash(name: str, value: float) -> float:
    # Bring each score into a similar, bounded range so one learning rate fits all.
    if name == "popularity":
        return math.log1p(1000.0 * max(value, 0.0)) / 7.0
    return math.tanh(value)


def _squash_many(name: str, values: FloatArray) -> FloatArray:
    if name == "popularity":
        out: FloatArray = np.log1p(1000.0 * np.maximum(values, 0.0)) / 7.0
        return out
    return np.tanh(values)


class OnlineLogistic:
    """river's ``LogisticRegression(optimizer=SGD(learning_rate), l2=l2)`` (default log
    loss, intercept rate 0.01, gradient clipped at 1e12, weights from zero), the same
    floats in the same order: the raw score sums ``w[name] * value`` in the order of the
    features' dict (river's ``VectorDict.dot`` iterates its argument), then adds the
    intercept; a learned feature missing from the weights is added at 0.0 in that order
    (river's learn mode does), so the weights' order -- the checkpoint's -- is the same
    too. Unit test ``test_skip_model_matches_river``. ~2 us a predict-and-learn against
    river's ~12 (its masked ``VectorDict`` and scheduler objects per call).
    """

    #: river's defaults for the intercept's learning rate and the gradient clip
    INTERCEPT_LR = 0.01
    CLIP = 1e12

    def __init__(self, learning_rate: float, l2: float = 0.0) -> None:
        self.learning_rate = learning_rate
        self.l2 = l2
        self._weights: dict[str, float] = {}
        self.intercept = 0.0
        self.n_iterations = 0  # river's optimizer.n_iterations

    @property
    def weights(self) -> dict[str, float]:
        """The weights, feature name -> value, in the order learned (a copy)."""
        return dict(self._weights)

    def raw(self, feats: Mapping[str, float]) -> float:
        """The logit of ``feats`` (river's ``_raw_dot_one``)."""
        get = self._weights.get
        z = 0.0
        for name, value in feats.items():
            z += get(name, 0.0) * value
        return z + self.intercept

    def proba(self, feats: Mapping[str, float]) -> float:
        """The probability of True (river's ``predict_proba_one(x)[True]``)."""
        return _sigmoid(self.raw(feats))

    def learn(self, feats: Mapping[str, float], y: bool, raw: float | None = None) -> None:
        """One SGD step on ``feats`` labelled ``y`` (``raw``: their logit, if known)."""
        z = self.raw(feats) if raw is None else raw
        g = max(min(_log_gradient(y, z), self.CLIP), -self.CLIP)
        self.intercept -= self.INTERCEPT_LR * g
        lr, l2 = self.learning_rate, self.l2
        weights = self._weights
        get = weights.get
        # an unseen feature starts at 0.0 and is added in the features' order, where
        # river's learn mode adds it (before its step): the same dict order
        for name, value in feats.items():
            w = get(name, 0.0)
            gi = g * value + w * l2 if l2 else g * value
            weights[name] = w - lr * gi
        self.n_iterations += 1


def _sigmoid(x: float) -> float:
    # river.utils.math.sigmoid
    if x < -30:
        return 0.0
    if x > 30:
        return 1.0
    return 1 / (1 + math.exp(-x))


def _log_gradient(y: bool, z: float) -> float:
    # river.optim.losses.Log().gradient(y_true=y, y_pred=z), weights 1
    sign = 1 if y else -1
    z = z * sign
    if z > 18.0:
        return 1.0 * math.exp(-z) * -sign
    if z < -18.0:
        return 1.0 * -sign
    return 1.0 * -sign / (math.exp(z) + 1.0)


class SkipClassifier(StateModel):
    """Online logistic regression on skip labels.

    Features: position in session, the listener's recent skip rate and skip streak context,
    context type (one-hot over the closed set :data:`stream.core.contexts.CONTEXTS`: free text
    is folded first, so the model keeps a bounded number of weights whatever producers
    write), hour of day (cyclic), and the track's popularity / MF / co-occurrence scores
    passed in ``x.features``.

    >>> m = SkipClassifier()
    >>> for i in range(200):
    ...     m.learn_one(Interaction("u", "t", 0, skipped=i % 2 == 0, context="radio" if i % 2
    ...                 else "search"))
    >>> m.predict_one(Interaction("u", "t", 0, context="search")) > 0.5
    True
    """

    def __init__(self, learning_rate: float = 0.05, l2: float = 0.0, seed: int = 0) -> None:
        check_positive("learning_rate", learning_rate)
        check_positive("l2", l2, allow_zero=True)
        self.learning_rate = learning_rate
        self.l2 = l2
        self.seed = seed
        self.classifier = OnlineLogistic(learning_rate, l2)
        self.n_learned = 0

    # -- checkpoints ----------------------------------------------------------------------

    _PARAMS: dict[str, Any] = {"learning_rate": float, "l2": float, "seed": int}
    _WHERE = "skip"

    def _export_fields(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The logistic regression's weights (feature names and values, in order),
        intercept and step count."""
        weights = self.classifier._weights
        names = list(weights.keys())
        blob, ends = encode_strings(names)
        fields: dict[str, Any] = {
            "intercept": float(self.classifier.intercept),
            "n_iterations": int(self.classifier.n_iterations),
            "n_learned": self.n_learned,
        }
        arrays: dict[str, np.ndarray] = {
            "feature_names.bytes": blob,
            "feature_names.ends": ends,
            "weights": np.array([weights[n] for n in names], dtype=np.float64),
        }
        return fields, arrays

    def _import_fields(
        self, manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray], where: str
    ) -> None:
        """The weights (one per named feature), intercept and step count."""
        array = partial(get_array, arrays, where=where)
        for name in ("feature_names.bytes", "feature_names.ends"):
            if name not in arrays:
                raise ValueError(f"{where}.{name}: missing array")
        names = unique_ids(f"{where}.feature_names", decode_strings(
            f"{where}.feature_names", arrays["feature_names.bytes"],
            arrays["feature_names.ends"], max_len=_FEATURE_LEN))
        values = array("weights", np.float64, shape=(len(names),), finite=True)
        clf = self.classifier
        clf.intercept = get_field(manifest, "intercept", float, where=where)
        clf.n_iterations = get_field(manifest, "n_iterations", int, where=where, lo=0)
        self.n_learned = get_field(manifest, "n_learned", int, where=where, lo=0)
        for name, value in zip(names, values.tolist(), strict=True):
            clf._weights[name] = value

    @staticmethod
    def context_features(x: Interaction) -> dict[str, float]:
        """The features that depend on the listener and moment, not on the track."""
        return _context_features(x.ts_ms, x.session_position, x.recent_skip_rate, x.context)

    def features(self, x: Interaction) -> dict[str, float]:
        feats = self.context_features(x)
        for name in TRACK_FEATURES:
            if name in x.features:
                feats[name] = _squash(name, x.features[name])
        return feats

    def learn_one(self, x: Interaction) -> None:
        self.classifier.learn(self.features(x), bool(x.skipped))
        self.n_learned += 1

    def predict_learn_one(self, x: Interaction) -> float:
        """:meth:`predict_one` then :meth:`learn_one` (prequential), building the features
        once; returns the prediction made before learning."""
        return self.predict_learn_features(self.features(x), bool(x.skipped))

    def predict_learn_features(self, feats: Mapping[str, float], skipped: bool) -> float:
        """:meth:`predict_learn_one` on features already built (:meth:`features`): the
        worker that owns a play builds them once and sends them to the others, who learn
        the same step with :meth:`learn_features`."""
        clf = self.classifier
        raw = clf.raw(feats)  # the same logit predicts, then learns (river computes it twice)
        clf.learn(feats, bool(skipped), raw)
        self.n_learned += 1
        return _sigmoid(raw)

    def learn_features(self, feats: Mapping[str, float], skipped: bool) -> None:
        """Learn one play from its features (another worker's play, see
        :meth:`predict_learn_features`); names outside :data:`FEATURE_NAMES` raise."""
        unknown = set(feats) - FEATURE_NAMES
        if unknown:
            raise ValueError(f"skip features: unknown name(s) {sorted(unknown)[:3]}")
        self.classifier.learn(feats, bool(skipped))
        self.n_learned += 1

    def predict_one(self, x: Interaction) -> float:
        """Probability that ``x.track_id`` is skipped (0.5 before any learning)."""
        return self.classifier.proba(self.features(x))

    def logit_terms(self, x: Interaction) -> tuple[float, float, float]:
        """What :meth:`predict_many` with popularity and MF scores adds up, for a compiled
        caller (``_blend_kernels.blend_matrix``): the intercept plus the context terms of
        ``x``, and the weights of the squashed popularity and MF scores."""
        return self.logit_terms_at(x.ts_ms, x.session_position, x.recent_skip_rate, x.context)

    def logit_terms_at(self, ts_ms: int, session_position: int, recent_skip_rate: float,
                       context: str | None = None) -> tuple[float, float, float]:
        """:meth:`logit_terms` of an :class:`Interaction` with these fields, without
        building one (a learned ranking's hot path: the same floats)."""
        weights = self.classifier._weights
        base = float(self.classifier.intercept)
        for name, value in _context_features(ts_ms, session_position, recent_skip_rate,
                                             context).items():
            base += weights.get(name, 0.0) * value
        return base, float(weights.get("popularity", 0.0)), float(weights.get("mf", 0.0))

    def predict_many(self, x: Interaction, track_features: Mapping[str, FloatArray]) -> FloatArray:
        """Skip probabilities for many candidate tracks at once (vectorised)."""
        size = len(next(iter(track_features.values()))) if track_features else 0
        weights = self.classifier._weights
        base = float(self.classifier.intercept)
        for name, value in self.context_features(x).items():
            base += weights.get(name, 0.0) * value
        logit = np.full(size, base)
        for name, values in track_features.items():
            w = weights.get(name, 0.0)
            if w:
                logit += w * _squash_many(name, values)
        # np.minimum(np.maximum(.)): np.clip's values without its ~10 us of Python wrapping
        out: FloatArray = 1.0 / (1.0 + np.exp(-np.minimum(np.maximum(logit, -30.0), 30.0)))
        return out
