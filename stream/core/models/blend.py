"""The learned blend: online learning-to-rank over the components' candidates.

For each play, the candidates ranked for the listener *before* learning it (test-then-train)
are the example: the played track, when it is a candidate, is the positive. The default
step (``loss="softmax"``, session 16) is ListNet's: one SGD step on the log-probability
that the played track comes first under ``softmax(X @ w)`` over the whole list, ``w +=
lr_t * (x_pos - sum_j p_j x_j - l2 * w)``, with ``lr_t = learning_rate / sqrt(1 + t /
lr_decay)`` after ``t`` steps. It corrects the candidates the model ranks high most,
which is what HR@10 and MRR@10 count; the pairwise step before it (``loss="pairwise"``,
kept for old checkpoints and comparison) was a logistic regression on the difference of
the positive and ``negatives`` candidates drawn by a seeded hash (a linear RankNet:
``w -= lr * (-d / (1 + exp(w . d)) + l2 * w)``, the update river's ``LogisticRegression``
with ``SGD(lr)`` makes, unit test ``test_learned_blend_matches_river``), which optimises
the order of random pairs (AUC), not the top of the list. Ranking is ``w . x`` per
candidate plus a tiny multiple of the fixed blend's score (feature ``prior``) so that an
untrained model ranks as the fixed blend does and ties break by it. Both steps are
deterministic (the softmax draws nothing; the pairwise draw is a seeded hash).

Features per candidate (:data:`FEATURES`; built by ``stream.core.recommender``):

- ``prior``: the fixed blend's score (normalised co-occurrence + 0.1 MF + 0.1 trending);
- per component (``cooc``, ``stan``, ``sr``, ``pop``, ``mf``): its score normalised to
  [0, 1] over the candidates (``s_*``) and its reciprocal rank among them (``r_*``, 0 when
  the component does not score the track);
- ``skip``: the skip model's probability for the track;
- ``hist_*``: log listener history length times the co-occurrence, STAN and MF scores
  (history length alone is the same for every candidate of a list, so only its products
  can change an order);
- ``age``: log days since the track was first played; ``log_pop``: log trending share;
- ``same_artist``: same artist as the listener's last play; ``own_history``: the track is
  in the listener's own longer history (the repeats option);
- ``s_artist`` / ``r_artist``: the artist source (the latest tracks of the artists of the
  listener's last two plays, newest first), ``s_own`` / ``r_own``: the own-history source
  (repeats option; most recently played first);
- ``share_cooc`` / ``share_stan`` / ``share_sr``: the candidate's share of the source's
  score mass over the candidates (how confident the source is: one dominant rule after an
  album track, or many weak ones), which the max-normalised ``s_*`` hide;
- ``sr_x_stan`` / ``sr_x_cooc``: products of the normalised scores (the sources agree);
- ``s_cooc_long`` / ``r_cooc_long`` / ``hist_cooc_long``: co-occurrence queried with the
  listener's longer history (``blend_cooc_window`` = 30 plays, decay 0.9, against 10 and
  0.8 for ``s_cooc``), and its product with the history length;
- ``log_cooc`` / ``log_stan`` / ``log_sr`` / ``log_cooc_long``: :func:`log_score` of the
  normalised scores (a linear model over ``s`` cannot tell a weak from a very weak
  candidate; both are ~0);
- ``s_sr_last`` / ``s_cooc_last`` / ``r_sr_last`` / ``r_cooc_last``: the sequential rules
  and co-occurrence neighbours of the listener's last play alone (normalised score and
  reciprocal rank), which the decayed queries over the last 5 or 10 plays mix away;
- ``recent_artist`` (session 17): the candidate's artist's share of the listener's last
  ``ARTIST_WINDOW`` (30) plays with a known artist, each weighted ``0.9 ** (plays
  since)``, where ``same_artist`` sees only the last play (on 30Music a listener's next
  track is often by an artist of their recent listening who is not the last play's).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from stream.core.models import _learn_kernels as _lk
from stream.core.models._blend_kernels import blend_scores
from stream.core.models._state import build, get_field, get_params
from stream.core.models._vocab import IntArray
from stream.core.models.base import FloatArray, check_positive

FEATURES: Final = (
    "prior",
    "s_cooc", "s_stan", "s_sr", "s_pop", "s_mf",
    "r_cooc", "r_stan", "r_sr", "r_pop", "r_mf",
    "skip",
    "hist_cooc", "hist_stan", "hist_mf",
    "age", "log_pop",
    "same_artist", "own_history",
    "s_artist", "r_artist", "s_own", "r_own",
    "share_cooc", "share_stan", "share_sr", "sr_x_stan", "sr_x_cooc",
    "s_cooc_long", "r_cooc_long", "hist_cooc_long",
    "log_cooc", "log_stan", "log_sr", "log_cooc_long",
    "s_sr_last", "s_cooc_last", "r_sr_last", "r_cooc_last",
    "recent_artist",
)
N_FEATURES: Final = len(FEATURES)
Float32Array = npt.NDArray[np.float32]
#: weight of the fixed blend's score added to the learned one (order of an untrained model)
PRIOR_EPS: Final = 1e-3
#: the training steps (``loss``): a softmax over the whole list (ListNet), or logistic
#: pairs against sampled negatives (RankNet; the blend's step before session 16)
LOSSES: Final = ("softmax", "pairwise")
#: the largest |value| of a step row the blend applies (and a signal may carry): a trained
#: model's rows are small (features ~[0, 10]); beyond it, or not finite, a row is skipped
MAX_ROW_VALUE: Final = 1e3
#: the largest |weight| a checkpoint may hold (a trained blend's are below ~100)
MAX_WEIGHT: Final = 1e6
#: the log features' scale: ``log(s) / LOG_SCALE + 1``, clipped at 0 (s below e**-7 ~ 0.001)
LOG_SCALE: Final = 7.0

_MASK64: Final = (1 << 64) - 1
_NO_ROWS: Final[Float32Array] = np.zeros((0, N_FEATURES), dtype=np.float32)
#: what a checkpoint without a ``loss`` (written before session 16: pairwise steps at a
#: constant rate) learns with once restored: today's default step and rates; its weights
#: and step count ``optimizer_iterations`` (t) are kept, so the rate goes on decaying from
#: where a model trained that long would be (the constructor's defaults: a unit test checks)
OLD_CHECKPOINT_DEFAULTS: Final[dict[str, Any]] = {
    "loss": "softmax", "learning_rate": 0.05, "lr_decay": 3000.0}


def log_score(values: FloatArray) -> FloatArray:
    """The ``log_*`` features of max-normalised scores ``values`` (in [0, 1]): ``log(v) /
    LOG_SCALE + 1`` clipped at 0, and 0 where ``v`` is 0 -- the reference of the compiled
    ``blend_features``. A linear model over ``s`` alone cannot tell 0.01 from 0.001 (both
    ~0); on MovieLens the log of the SR and STAN scores carried most of session 16's gain.

    >>> log_score(np.array([0.0, 1.0, math.exp(-3.5), 1e-5])).tolist()
    [0.0, 1.0, 0.5, 0.0]
    """
    # math.log per value, as the compiled kernel computes it (numpy's SIMD log may differ
    # in the last bit)
    return np.array([max(math.log(v) / LOG_SCALE + 1.0, 0.0) if v > 0.0 else 0.0
                     for v in values.tolist()], dtype=np.float64)


def usable_rows(rows: np.ndarray) -> bool:
    """Whether step rows may be applied (and sent): every value finite and at most
    MAX_ROW_VALUE in size. A non-finite feature of one candidate (or weights so large the
    scores overflow) would make the softmax row NaN, and one NaN step poisons the weights
    for good: their checkpoints (JSON without NaN) fail and peers refuse their signals."""
    return bool(np.isfinite(rows).all()) and (
        not rows.size or float(np.abs(rows).max()) <= MAX_ROW_VALUE)


def _mix(x: int) -> int:
    """splitmix64: a seeded, stateless hash (nothing to checkpoint)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class LearnedBlend:
    """Online linear ranking over candidate feature rows (softmax or pairwise steps).

    >>> import numpy as np
    >>> m = LearnedBlend(seed=1)
    >>> X = np.zeros((3, N_FEATURES)); X[:, 2] = [0.0, 1.0, 0.2]  # s_stan
    >>> for i in range(50):
    ...     _ = m.learn(X, positive=1, key=i)
    >>> int(np.argmax(m.score(X)))
    1
    """

    def __init__(
        self,
        learning_rate: float = 0.05,
        l2: float = 1e-5,
        negatives: int = 3,
        hard_pool: int = 1000,
        prior_init: float = 1.0,
        seed: int = 0,
        loss: str = "softmax",
        lr_decay: float = 3000.0,
    ) -> None:
        check_positive("learning_rate", learning_rate)
        check_positive("l2", l2, allow_zero=True)
        check_positive("lr_decay", lr_decay, allow_zero=True)
        if 0 < lr_decay < 1:  # a few steps would all but freeze the blend
            raise ValueError(f"lr_decay must be 0 (a constant rate) or >= 1, not {lr_decay}")
        if negatives < 1 or hard_pool < 1:
            raise ValueError("negatives and hard_pool must be >= 1")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, not {loss!r}")
        self.learning_rate = learning_rate
        self.l2 = l2
        self.negatives = negatives
        self.hard_pool = hard_pool
        self.prior_init = prior_init
        self.seed = seed
        self.loss = loss
        #: the step size after t steps is learning_rate / sqrt(1 + t / lr_decay) (0: constant)
        self.lr_decay = lr_decay
        # start from the fixed blend (weight prior_init on its score) and learn from there
        self._w: FloatArray = np.zeros(N_FEATURES)
        self._w[0] = prior_init
        self.n_learned = 0  # lists learned from
        self.n_pairs = 0  # step rows applied (pairs, or one per list with the softmax)
        self.iterations = 0  # SGD steps (kept in the checkpoint as optimizer_iterations)

    def step_size(self) -> float:
        """The learning rate of the next step (decays with the steps taken, ``lr_decay``)."""
        if not self.lr_decay:
            return self.learning_rate
        return self.learning_rate / math.sqrt(1.0 + self.iterations / self.lr_decay)

    @property
    def weights(self) -> FloatArray:
        """The learned weight per feature (in :data:`FEATURES` order; a copy)."""
        return self._w.copy()

    @property
    def weights_token(self) -> object:
        """An object that is the same (``is``) as long as the weights are: every step
        replaces the weight array, never changes it in place, so a ranking's order can be
        reused by :meth:`pairs` while this token holds."""
        return self._w

    def score(self, X: FloatArray) -> FloatArray:
        """Ranking score per candidate row of ``X`` (``len(X) x N_FEATURES``):
        ``X @ w + PRIOR_EPS * X[:, 0]``, compiled (``_blend_kernels.blend_scores``, which
        does not check bounds: a wrong shape raises ValueError here)."""
        if X.ndim != 2 or X.shape[1] != len(self._w):
            raise ValueError(f"blend score: X has shape {X.shape}, expected (n, {len(self._w)})")
        out: FloatArray = blend_scores(np.ascontiguousarray(X, dtype=np.float64), self._w,
                                       PRIOR_EPS)
        return out

    def score_inputs(self, n_features: int) -> tuple[FloatArray, float]:
        """:meth:`score`'s weights and prior weight, for a compiled caller scoring rows of
        ``n_features`` values (``_blend_kernels.blend_rank``); ValueError, as :meth:`score`
        raises, when the weights have another length."""
        if n_features != len(self._w):
            raise ValueError(f"blend score: rows of {n_features} features, expected "
                             f"{len(self._w)}")
        return self._w, PRIOR_EPS

    def learn(self, X: FloatArray, positive: int, key: int) -> int:
        """Learn from one ranked list whose row ``positive`` was played; ``key`` (e.g. the
        count of plays learned) seeds the choice of negatives. Returns the pairs learned."""
        return self.apply_pairs(self.pairs(X, positive, key))

    def pairs(self, X: FloatArray, positive: int, key: int,
              order: IntArray | None = None) -> Float32Array:
        """The step rows of one ranked list (see :meth:`learn`), as float32 (``0 x
        N_FEATURES`` when there is nothing to learn). These rows are the blend's step:
        another worker's blend takes the same step from them (:meth:`apply_pairs`;
        docs/scaling.md). Learns nothing.

        With ``loss="softmax"`` (ListNet): one row, ``x_pos - sum_j p_j x_j`` with ``p``
        the softmax of the list's scores ``X @ w`` -- the gradient of the log-probability
        that the played track comes first; every candidate is pushed down in proportion
        to how likely the model thought it, so the top of the list gets the strongest
        correction (pairs on random negatives optimise the whole order, not the top).
        With ``loss="pairwise"``: one row ``x_pos - x_neg`` per chosen negative, drawn by a
        seeded hash of ``key`` from the list's first ``hard_pool`` (``order``: the list's
        ranking by these weights, ``np.argsort(-score(X), kind="stable")``, if known)."""
        n = len(X)
        if n < 2 or not 0 <= positive < n:
            return _NO_ROWS
        if self.loss == "softmax":
            # a non-finite feature (or an overflow) ends in a non-finite row: skipped
            self._check(X)
            row: Float32Array = np.empty((1, N_FEATURES), dtype=np.float32)
            _lk.softmax_row(np.ascontiguousarray(X, dtype=np.float64), positive, self._w,
                            row[0])
            return row if _lk.usable(row, MAX_ROW_VALUE) else _NO_ROWS
        if order is None:
            order = np.argsort(-self.score(X), kind="stable")
        top = order[: self.hard_pool + 1]
        pool = top[top != positive].tolist()
        h = _mix(self.seed * 0x100000001B3 ^ key)
        chosen: list[int] = []
        for j in range(min(self.negatives, len(pool))):
            h = _mix(h + j)
            pick = pool[h % len(pool)]
            if pick not in chosen:
                chosen.append(pick)
        with np.errstate(all="ignore"):
            diffs: Float32Array = (X[positive] - X[chosen]).astype(np.float32)
        return diffs.reshape(len(chosen), N_FEATURES) if usable_rows(diffs) else _NO_ROWS

    def learn_played(self, rows: IntArray, played: int, X: FloatArray) -> Float32Array | None:
        """:meth:`pairs` then :meth:`apply_pairs` for the list of candidate ``rows`` (feature
        rows ``X``) of which row ``played`` was played, in one compiled call
        (``_learn_kernels.softmax_learn``; softmax loss only). Returns the step row (1 x
        N_FEATURES, float32) or None when nothing was learned: ``played`` not among at
        least two candidates, an unusable row, or a step beyond MAX_WEIGHT."""
        if self.loss != "softmax":
            raise ValueError("learn_played takes the softmax step only")
        self._check(X)
        if len(rows) != len(X):  # the kernel reads X[i] for the i where rows[i] == played
            raise ValueError(f"blend: {len(rows)} candidate rows for {len(X)} feature rows")
        row: Float32Array = np.empty((1, N_FEATURES), dtype=np.float32)
        out: FloatArray = np.empty(N_FEATURES)
        status = _lk.softmax_learn(rows, played, np.ascontiguousarray(X, dtype=np.float64),
                                   self._w, self.step_size(), self.l2, MAX_ROW_VALUE,
                                   MAX_WEIGHT, row[0], out)
        if status != _lk.LEARNED:
            return None
        self._took_step(out, 1)
        return row

    def _check(self, X: FloatArray) -> None:
        # the kernels do not check bounds
        if X.ndim != 2 or X.shape[1] != N_FEATURES:
            raise ValueError(f"blend: X has shape {X.shape}, expected (n, {N_FEATURES})")

    def _took_step(self, w: FloatArray, rows: int) -> None:
        self._w = w  # a new array: weights_token changes
        self.iterations += rows
        self.n_learned += 1
        self.n_pairs += rows

    def apply_pairs(self, diffs: Float32Array) -> int:
        """One SGD step per row of ``diffs`` (the rows of :meth:`pairs`, this worker's or
        another's): the same step whichever worker ranked the list. Returns the rows
        learned. Rows of another shape, or not finite or beyond MAX_ROW_VALUE
        (:func:`usable_rows`), or a step that would take a weight beyond MAX_WEIGHT,
        raise ValueError and nothing is learned.

        Softmax: ``w += lr_t * (d - l2 * w)`` (``d`` is already the gradient). Pairwise:
        the logistic step on ``d = x_pos - x_neg``, ``w -= lr_t * (-d / (1 + exp(w . d))
        + l2 * w)``. ``lr_t`` is :meth:`step_size`."""
        if diffs.ndim != 2 or diffs.shape[1] != N_FEATURES:
            raise ValueError(f"blend pairs: shape {diffs.shape}, expected (n, {N_FEATURES})")
        if not len(diffs):
            return 0
        # a writable float32 copy: the compiled signature warm_up made, whatever came in
        diffs = np.array(diffs, dtype=np.float32, order="C")
        if not _lk.usable(diffs, MAX_ROW_VALUE):
            raise ValueError(f"blend pairs: not finite or beyond {MAX_ROW_VALUE}")
        if self.loss == "softmax" and len(diffs) == 1:  # the softmax step: one row
            out: FloatArray = np.empty(N_FEATURES)
            if not _lk.softmax_step(self._w, diffs[0],
                                    self.step_size(), self.l2, MAX_WEIGHT, out):
                raise ValueError(f"blend step: a weight would exceed {MAX_WEIGHT}")
            self._took_step(out, 1)
            return 1
        w = self._w
        l2 = self.l2
        softmax = self.loss == "softmax"
        t0 = self.iterations
        for d in diffs.astype(np.float64):
            lr = self.step_size()
            if softmax:
                w = w + lr * (d - l2 * w) if l2 else w + lr * d
            else:
                z = float(d @ w)
                # river's Log loss gradient for label True (clamped like river, |z| > 18)
                g = (-math.exp(-z) if z > 18.0
                     else (-1.0 if z < -18.0 else -1.0 / (math.exp(z) + 1.0)))
                step = g * d
                if l2:
                    step += l2 * w
                w = w - lr * step
            self.iterations += 1
        if not float(np.abs(w).max()) <= MAX_WEIGHT:  # NaN too: the step is not taken
            self.iterations = t0
            raise ValueError(f"blend step: a weight would exceed {MAX_WEIGHT}")
        self._w = w
        self.n_learned += 1
        self.n_pairs += len(diffs)
        return len(diffs)

    # -- state ----------------------------------------------------------------------------

    _PARAMS: dict[str, Any] = {
        "learning_rate": float, "l2": float, "negatives": int, "hard_pool": int,
        "prior_init": float, "seed": int,
        # optional: a checkpoint from before session 16 has neither (OLD_CHECKPOINT_DEFAULTS)
        "loss": (str, type(None)), "lr_decay": (float, type(None)),
    }

    def export_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The weights as JSON (feature -> weight) plus counters (no arrays).
        See :mod:`stream.core.models._state`."""
        manifest: dict[str, Any] = {
            "params": {name: getattr(self, name) for name in self._PARAMS},
            "weights": {f: float(w) for f, w in zip(FEATURES, self._w.tolist(), strict=True)},
            "n_learned": self.n_learned,
            "n_pairs": self.n_pairs,
            "optimizer_iterations": self.iterations,
        }
        return manifest, {}

    @classmethod
    def import_state(
        cls,
        manifest: Mapping[str, Any],
        arrays: Mapping[str, np.ndarray],
        *,
        vocabulary: Any = None,
        where: str = "ranker",
    ) -> LearnedBlend:
        """The blend :meth:`export_state` described, every field checked (ValueError names
        the bad one). ``vocabulary`` is accepted for the common signature (the blend holds
        no track ids)."""
        stored = manifest.get("params") if isinstance(manifest, Mapping) else None
        if isinstance(stored, Mapping):  # before session 16: no loss / lr_decay
            manifest = {**manifest, "params": {"loss": None, "lr_decay": None, **stored}}
        params = get_params(manifest, where, cls._PARAMS)
        if params["loss"] is None:
            # a checkpoint from before the softmax step (session 16) keeps its weights and
            # its step count t, and learns from now on with today's defaults
            params.update(OLD_CHECKPOINT_DEFAULTS)
        elif params["lr_decay"] is None:
            params["lr_decay"] = OLD_CHECKPOINT_DEFAULTS["lr_decay"]
        model: LearnedBlend = build(where, cls, params)
        weights = get_field(manifest, "weights", dict, where=where)
        unknown = set(weights) - set(FEATURES)
        if unknown:
            raise ValueError(f"{where}.weights: unknown feature(s) {sorted(unknown)[:5]}")
        clean = {name: get_field(weights, name, float, where=f"{where}.weights",
                                 lo=-MAX_WEIGHT, hi=MAX_WEIGHT)
                 for name in FEATURES if name in weights}
        # every step applies one row (river's optimizer counted one per pair too) and
        # every list learned gives at least one, so t <= n_pairs and n_learned <= n_pairs:
        # a larger t would freeze the decaying rate
        model.n_pairs = get_field(manifest, "n_pairs", int, where=where, lo=0)
        model.n_learned = get_field(manifest, "n_learned", int, where=where, lo=0,
                                    hi=model.n_pairs)
        model.iterations = get_field(manifest, "optimizer_iterations", int, where=where,
                                     lo=0, hi=model.n_pairs)
        model._w = np.array([clean.get(f, 0.0) for f in FEATURES])
        return model
