"""The recommendation core: learns from one play at a time and ranks tracks for a listener.

Pure: no Kafka, Redis or Prometheus. The worker, the offline replay and the benchmarks all
drive this same class. Time is always the event's time, passed in.

>>> from stream.core.events import PlayEvent
>>> from stream.core.session import update_session
>>> rec = Recommender()
>>> states = {}
>>> for i, (user, track) in enumerate([("u", "a"), ("u", "b"), ("v", "a")]):
...     up = update_session(states.get(user), PlayEvent(user, track, 1_700_000_000_000 + i,
...                                                     200_000, f"e{i}"))
...     _ = rec.learn_one(up)
...     states[user] = up.state
>>> [(r.track_id, r.reason) for r in rec.recommend(states["v"], k=2, now_ms=1_700_000_000_010)]
[('b', 'because you played a')]
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import operator
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from typing import Any, Final, Protocol, cast

import numpy as np

from stream.core.events import PlayEvent
from stream.core.listener_record import decode_listener_record, encode_listener_record
from stream.core.models import _blend_kernels as _bk
from stream.core.models import _kernels as _k
from stream.core.models import _session_kernels as _sk
from stream.core.models._state import (
    build,
    decode_strings,
    encode_strings,
    get_array,
    get_field,
    get_params,
    prefixed,
    under,
    unique_ids,
)
from stream.core.models._vocab import (
    BoolArray,
    EvictionPlan,
    EvictionSteps,
    IntArray,
    Vocabulary,
    drain,
    grow_rows,
    reserve_rows,
    top_rows,
)
from stream.core.models.base import FloatArray, Interaction
from stream.core.models.blend import N_FEATURES, LearnedBlend, usable_rows
from stream.core.models.cooccurrence import SessionCooccurrence
from stream.core.models.drift import SkipRateDrift
from stream.core.models.factorization import Float32Array, ImplicitMF
from stream.core.models.popularity import DecayedPopularity
from stream.core.models.rules import SequentialRules
from stream.core.models.skip import SkipClassifier
from stream.core.models.stan import SessionKNN
from stream.core.ranking import (
    DEFAULT_WEIGHTS,
    RankedItem,
    Recommendation,
    rank_tracks,
    reason_text,
)
from stream.core.session import SessionUpdate, UserState
from stream.core.shards import MASK as SHARD_MASK
from stream.core.shards import ShardedDict
from stream.core.slots import positional_builder

__all__ = [
    "VARIANTS",
    "ItemStep",
    "ItemStepLike",
    "LearnResult",
    "Recommendation",
    "Recommender",
    "SeenTracks",
    "SnapshotError",
]

MODEL_VERSION: Final = "blend-3"  # 3: learned blend over co-occurrence, STAN, SR, MF, trending

#: Ways to rank, for side-by-side evaluation: each single component alone (``sknn`` is the
#: STAN index queried without its three weights), the fixed-weight blend (``fixed``) and the
#: learned blend (``blend``, what the worker publishes unless ``blend="fixed"``).
VARIANTS: Final = ("popularity", "mf", "cooccurrence", "sknn", "stan", "sr", "fixed", "blend")
#: the variants ranked by :meth:`Recommender._rank_session_model`
_SESSION_VARIANTS: Final = frozenset({"sknn", "stan", "sr"})
#: the variants that rank with one component alone (through the compiled query)
_SINGLE_COMPONENTS: Final = frozenset({"popularity", "mf", "cooccurrence"})
#: SR's query reads the last 5 tracks (decay 0.6), not only the last one: on the first 25,000
#: 30Music plays HR@10 0.0312 -> 0.0359, MRR@10 0.0264 -> 0.0296 (docs/benchmarks.md)
DEFAULT_RULES: Final[Mapping[str, Any]] = {"query_window": 5, "query_decay": 0.6}
#: what a ``variant="blend"`` query runs for each ``blend`` setting
BLEND_MODES: Final = ("learned", "fixed")


class SnapshotError(ValueError):
    """A snapshot blob is not one this version of the recommender can restore."""


#: how many of the listener's preceding tracks an item step carries: the longest window
#: an item-side model learns from (co-occurrence's ``cooc_window`` and SR's ``steps``, 10
#: by default)
ITEM_HISTORY: Final = 10


class ItemStepLike(Protocol):
    """What :meth:`Recommender.apply_item_steps` reads from one play learned elsewhere
    (:class:`ItemStep`, or the replication layer's validated signal)."""

    @property
    def track_id(self) -> str: ...
    @property
    def ts_ms(self) -> int: ...
    @property
    def skipped(self) -> bool: ...
    @property
    def history(self) -> tuple[str, ...]: ...
    @property
    def artist_id(self) -> str | None: ...
    @property
    def context(self) -> str | None: ...
    @property
    def position(self) -> int: ...
    @property
    def session(self) -> str: ...
    @property
    def factors(self) -> Float32Array | None: ...
    @property
    def negatives(self) -> tuple[str, ...]: ...
    @property
    def skip_features(self) -> Mapping[str, float] | None: ...
    @property
    def blend_pairs(self) -> Float32Array | None: ...
    @property
    def blend_loss(self) -> str: ...


@dataclass(frozen=True, slots=True)
class ItemStep:
    """Everything the item side learned from one play, so that another recommender takes
    the same step (:meth:`Recommender.apply_item_steps`) without the listener: the track,
    the listener's preceding tracks (at most :data:`ITEM_HISTORY`), skip flag, time,
    artist, context, position in the session (-1: unknown), an opaque session token
    (session-kNN groups a session's plays by it; "": unknown), the listener's MF factors
    *before* the step and the negatives it sampled (MF takes the same item step), and the
    skip model's features (the skip model takes the same step), and the learned blend's
    step rows (:meth:`LearnedBlend.pairs`: one softmax gradient row per list, or
    ``x_pos - x_neg`` per pair with the pairwise loss; the blend takes the same step; None
    when the owner's blend learned nothing from the play) with the loss that made them
    (``blend_loss``: a blend with another loss does not apply them)."""

    track_id: str
    ts_ms: int
    skipped: bool
    history: tuple[str, ...] = ()
    artist_id: str | None = None
    context: str | None = None
    position: int = -1
    session: str = ""
    factors: Float32Array | None = None
    negatives: tuple[str, ...] = ()
    skip_features: Mapping[str, float] | None = None
    #: the owner's number of this play (its ``n_learned`` after learning it)
    seq: int = -1
    blend_pairs: Float32Array | None = None
    blend_loss: str = ""

    def __eq__(self, other: object) -> bool:  # the factors are an array
        if not isinstance(other, ItemStep):
            return NotImplemented
        return (same_array(self.factors, other.factors)
                and same_array(self.blend_pairs, other.blend_pairs)
                and all(getattr(self, f) == getattr(other, f) for f in _STEP_FIELDS))

    __hash__ = None  # type: ignore[assignment]


_STEP_FIELDS: Final = ("track_id", "ts_ms", "skipped", "history", "artist_id", "context",
                       "position", "session", "negatives", "skip_features", "seq",
                       "blend_loss")


def same_array(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Both None, or equal arrays."""
    return (a is None and b is None) or (
        a is not None and b is not None and np.array_equal(a, b))


@dataclass(frozen=True, slots=True)
class LearnResult:
    """What learning one event revealed: the skip model's prediction for it (made before
    learning, for prequential accuracy), whether the skip-rate drift detector fired, and
    the item step other workers need (None for a duplicate)."""

    skip_probability: float
    skipped: bool
    drift: bool
    step: ItemStep | None = None


#: the per-play records built positionally without their frozen __init__ (stream.core.slots)
_build_interaction: Final = positional_builder(Interaction)
_build_learn_result: Final = positional_builder(LearnResult)


def session_token(state: UserState) -> str:
    """An opaque token of the listener's current session (blake2b of its key, which names
    the listener): session-kNN groups a session's plays by it on every worker, so the
    session continues wherever its listener's partition moves, and no worker but the
    owner learns who played it."""
    key = state.session_key
    token = _TOKENS.get(key)
    if token is None:  # once per session, not per play (a listener's plays share the key)
        if len(_TOKENS) >= _MAX_TOKENS:
            _TOKENS.clear()
        token = _TOKENS[key] = f"s:{hashlib.blake2b(key.encode(), digest_size=8).hexdigest()}"
    return token


#: recent session keys' tokens (bounded: cleared when full)
_TOKENS: dict[str, str] = {}
_MAX_TOKENS: Final = 8192


class Recommender:
    """Blend of session co-occurrence, online MF and trending, with a skip-model penalty.

    Parameters are plain values so the worker can build it from configuration:

    - ``weights``: blend weight per component (``cooccurrence``, ``mf``, ``popularity``,
      ``skip``); missing names take :data:`stream.core.ranking.DEFAULT_WEIGHTS`.
    - ``history_window`` / ``history_decay``: how many recent tracks seed co-occurrence
      candidates, and their geometric weight by distance.
    - ``recent_filter``: never recommend the listener's last N tracks.
    - ``max_per_artist``: at most this many tracks of one artist per list (when artist ids
      are known); ``None`` disables the cap.
    - ``candidates_per_source``: candidate-set size drawn from each component.
    - ``cross_session``: learn co-occurrence across a listener's session boundary too.
    - ``blend``: what ``variant="blend"`` (the worker's lists) ranks with: ``"learned"``
      (:class:`~stream.core.models.blend.LearnedBlend` over every component's candidates, see
      docs/blend.md) or ``"fixed"`` (the fixed weights, as variant ``fixed``).
    - ``stan_params`` / ``rules_params`` / ``blend_params``: constructor arguments of the
      session-kNN (:class:`~stream.core.models.stan.SessionKNN`), sequential-rules
      (:class:`~stream.core.models.rules.SequentialRules`) and learned-blend models.
    - ``session_scope``: what the session models (STAN, SR) query with: the listener's
      current ``"session"`` or all their ``"recent"`` tracks.
    - ``artist_tracks``: the learned blend also draws the latest tracks of the artists of
      the listener's last two plays; this many are kept per artist (0: off).
    - ``repeats``: keep each listener's last N distinct tracks and let the learned blend
      recommend them again once they are out of the recent filter (0: off; "repeats are
      music", measured with ``stream replay --exclude-seen recent --repeats N``).
    - ``blend_candidates``: candidates drawn from each component for the learned blend.
    - ``blend_cooc_window`` / ``blend_cooc_decay``: the learned blend's second
      co-occurrence source, queried with the listener's last N plays (weight decay ** the
      distance; 0 or None: off). A checkpoint without them restores with it off.
    - ``session_models``: learn the session-kNN/STAN and SR models and the learned blend's
      other sources (artist tracks, own history, track ages). Off: each play costs what it
      did before they existed (the live worker with its default ``ranker=fixed``; variants
      ``sknn``/``stan``/``sr`` then fall back to trending). ``blend="learned"`` needs it.
    - ``mf_candidates``: also draw the listener's nearest tracks in MF space over the
      whole catalogue as candidates. Off by default: on MovieLens-100K it changed HR@10 by
      0.00003 and cost 40 % of the replay time, and its cost grows with the catalogue; MF
      still scores (and explains) every candidate. Single-component ``mf`` ranking always
      retrieves.
    - ``max_users``: at most this many listeners keep MF factors (least recently played
      first out; see :meth:`limit_users`); ``None``: no bound.
    """

    def __init__(
        self,
        *,
        weights: Mapping[str, float] | None = None,
        history_window: int = 10,
        history_decay: float = 0.8,
        cooc_window: int = 10,
        cooc_decay: float = 0.8,
        recent_filter: int = 30,
        max_per_artist: int | None = 3,
        candidates_per_source: int = 50,
        cross_session: bool = True,
        n_factors: int = 32,
        popularity_half_life_ms: float = 7 * 24 * 3600 * 1000,
        seed: int = 0,
        mf_candidates: bool = False,
        max_users: int | None = None,
        blend: str = "learned",
        stan_params: Mapping[str, Any] | None = None,
        rules_params: Mapping[str, Any] | None = None,
        blend_params: Mapping[str, Any] | None = None,
        blend_candidates: int = 30,
        session_scope: str = "session",
        artist_tracks: int = 50,
        repeats: int = 0,
        session_models: bool = True,
        blend_cooc_window: int | None = 30,
        blend_cooc_decay: float | None = 0.9,
    ) -> None:
        if recent_filter < 0:
            raise ValueError(f"recent_filter must be >= 0, got {recent_filter!r}")
        if candidates_per_source < 1:
            raise ValueError(f"candidates_per_source must be >= 1, got {candidates_per_source!r}")
        if max_per_artist is not None and max_per_artist < 1:
            raise ValueError(f"max_per_artist must be >= 1 or None, got {max_per_artist!r}")
        if blend not in BLEND_MODES:
            raise ValueError(f"blend must be one of {BLEND_MODES}, got {blend!r}")
        if blend == "learned" and not session_models:
            raise ValueError("blend='learned' needs session_models=True (its candidates)")
        if session_scope not in ("session", "recent"):
            raise ValueError(f"session_scope must be 'session' or 'recent', got {session_scope!r}")
        if artist_tracks < 0 or repeats < 0:
            raise ValueError("artist_tracks and repeats must be >= 0")
        if blend_candidates < 1:
            raise ValueError(f"blend_candidates must be >= 1, got {blend_candidates!r}")
        if blend_cooc_window is not None and blend_cooc_window < 0:
            raise ValueError(f"blend_cooc_window must be >= 0, got {blend_cooc_window!r}")
        if blend_cooc_decay is not None and not 0 < blend_cooc_decay <= 1:
            raise ValueError(f"blend_cooc_decay must be in (0, 1], got {blend_cooc_decay!r}")
        unknown = set(weights or {}) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown blend weight(s): {', '.join(sorted(unknown))}")
        self.weights = weights
        self.history_window = history_window
        self.history_decay = history_decay
        self.cooc_window = cooc_window
        self.cooc_decay = cooc_decay
        self.recent_filter = recent_filter
        self.max_per_artist = max_per_artist
        self.candidates_per_source = candidates_per_source
        self.cross_session = cross_session
        self.n_factors = n_factors
        self.popularity_half_life_ms = popularity_half_life_ms
        self.seed = seed

        self.mf_candidates = mf_candidates
        self.blend_weights: dict[str, float] = _float_weights(weights)
        self.vocabulary = Vocabulary()
        self.popularity = DecayedPopularity(
            half_life_ms=popularity_half_life_ms, vocabulary=self.vocabulary, seed=seed
        )
        self.cooccurrence = SessionCooccurrence(
            window=cooc_window,
            decay=cooc_decay,
            backward=1.0,
            query_window=history_window,
            query_decay=history_decay,
            vocabulary=self.vocabulary,
            seed=seed,
        )
        self.max_users = max_users
        self.mf = ImplicitMF(n_factors=n_factors, vocabulary=self.vocabulary, seed=seed,
                             max_users=max_users)
        self.skip = SkipClassifier(seed=seed)
        self.drift = SkipRateDrift(seed=seed)
        self.blend = blend
        self.stan_params = stan_params
        self.rules_params = rules_params
        self.blend_params = blend_params
        self.blend_candidates = blend_candidates
        self.session_scope = session_scope
        self.artist_tracks = artist_tracks
        self.repeats = repeats
        self.session_models = session_models
        self.blend_cooc_window = blend_cooc_window or 0
        self.blend_cooc_decay = 0.9 if blend_cooc_decay is None else blend_cooc_decay
        self._build_session_models()
        self.artist_of: ShardedDict[str, str] = ShardedDict()  # track -> artist
        self.n_learned = 0
        self.model_version = MODEL_VERSION

    def _build_session_models(self) -> None:
        """The session-kNN, sequential-rules and learned-blend models (fresh)."""
        self.session_knn = SessionKNN(**{**(self.stan_params or {}),
                                         "vocabulary": self.vocabulary, "seed": self.seed})
        self.rules = SequentialRules(**{**DEFAULT_RULES, **(self.rules_params or {}),
                                        "vocabulary": self.vocabulary, "seed": self.seed})
        self.ranker = LearnedBlend(**{**(self.blend_params or {}), "seed": self.seed})
        self.first_seen: IntArray = np.zeros(0, dtype=np.int64)
        #: artist -> their latest distinct tracks, oldest first (at most artist_tracks)
        self.tracks_of: dict[str, list[str]] = {}
        #: listener -> their last distinct tracks, oldest first (at most repeats)
        self.own_history: dict[str, dict[str, None]] = {}

    # -- learning -------------------------------------------------------------------------

    #: whether :meth:`learn_one` returns the :class:`ItemStep` it took (``LearnResult.step``):
    #: the replication of item learning between workers needs it; a worker that sends no
    #: signals (no ``worker_keys``) turns it off (:meth:`emit_item_steps`) and skips building
    #: it. The models learn exactly the same either way; ``n_learned`` counts every play.
    item_steps: bool = True

    def emit_item_steps(self, on: bool) -> None:
        """Return the item step of every learned play (on, the default) or not."""
        self.item_steps = bool(on)

    def learn_one(self, update: SessionUpdate, event: PlayEvent | None = None) -> LearnResult:
        """Learn from one applied event. Pass the ``event`` too when you have it: its
        artist id and context feed the diversity cap and the skip model. The result's
        ``step`` is None for a duplicate, and when :attr:`item_steps` is off."""
        if update.duplicate:
            return LearnResult(0.0, False, False)
        state, before = update.state, update.before
        if before.model and (state.user_id not in  # mf.user_factors, inlined
                             self.mf.user_factors.shards[hash(state.user_id) & SHARD_MASK]):
            # their partition-local state came with the session (rebalance, restart)
            with contextlib.suppress(ValueError):  # an unusable record: start afresh
                self.import_user(state.user_id, before.model)
        track = state.recent[-1]
        blend_pairs = None
        if self.blend == "learned" and before.recent:
            # test-then-train: the candidates ranked before this play, the play as positive
            blend_pairs = self._learn_blend(before, track, state.last_event_ts_ms)
        keep_history = self.cross_session or not update.new_session
        history = tuple(before.recent) if keep_history else ()
        context = event.context if event is not None else None
        session_models = self.session_models
        if event is not None and event.artist_id:
            self._note_artist(track, event.artist_id)
        if self.repeats and session_models:
            histories = self.own_history
            own = histories.pop(state.user_id, None) or {}
            histories[state.user_id] = own  # most recently played listener last
            own.pop(track, None)
            own[track] = None
            if len(own) > self.repeats:
                del own[next(iter(own))]
            if self.max_users is not None and len(histories) > self.max_users:
                del histories[next(iter(histories))]  # least recently played listener
        features: dict[str, float] = {}
        x = _build_interaction(  # positional, in field order (see stream.core.slots)
            state.user_id,  # user_id
            track,  # track_id
            state.last_event_ts_ms,  # ts_ms
            update.is_skip,  # skipped
            history,  # history
            0 if update.new_session else before.session_plays,  # session_position
            _recent_skip_rate(before),  # recent_skip_rate
            context,  # context
            event.artist_id if event is not None else None,  # artist_id
            features,  # features
        )
        # the other models' scores of this play *before* learning it, for the skip model
        # (their predict_one reads the listener, track and history, never the features)
        features["popularity"] = self.popularity.predict_one(x)
        features["mf"] = self.mf.predict_one(x)
        skip_features = self.skip.features(x)
        skip_probability = self.skip.predict_learn_features(skip_features, update.is_skip)
        self.drift.learn_one(x)
        self.popularity.learn_one(x)
        self.cooccurrence.learn_one(x)
        item_steps = self.item_steps
        user_before, rows = self.mf.learn_step(x, keep_before=item_steps)
        if session_models:
            self.session_knn.learn_play(session_token(state), track, x.ts_ms,
                                        x.session_position)
            self.rules.learn_one(x)
            self._first_seen(track, x.ts_ms)
        self.n_learned += 1
        state.model = self.export_user(state.user_id)
        if not item_steps:  # nobody sends it (see item_steps): the same learning, no step
            return _build_learn_result(skip_probability, update.is_skip,
                                       self.drift.drift_detected, None)
        token = session_token(state)
        ids = self.vocabulary.ids
        step = ItemStep(
            track_id=track, ts_ms=x.ts_ms, skipped=x.skipped,
            history=history[-ITEM_HISTORY:], artist_id=x.artist_id, context=context,
            position=x.session_position, session=token, factors=user_before,
            negatives=tuple([ids[r] for r in rows[1:]]), skip_features=skip_features,
            seq=self.n_learned, blend_pairs=blend_pairs,
            blend_loss=self.ranker.loss if blend_pairs is not None else "",
        )
        return LearnResult(skip_probability, update.is_skip, self.drift.drift_detected, step)

    def _first_seen(self, track: str, ts_ms: int) -> None:
        row = self.vocabulary.index[track]
        if row >= len(self.first_seen):
            self.first_seen = grow_rows(self.first_seen, row + 1)
        if self.first_seen[row] == 0:
            self.first_seen[row] = max(ts_ms, 1)

    def _note_artist(self, track: str, artist: str) -> None:
        self.artist_of.shards[hash(track) & SHARD_MASK][track] = artist  # artist_of[track]
        if self.artist_tracks and self.session_models:
            latest = self.tracks_of.setdefault(artist, [])
            if track in latest:
                latest.remove(track)
            latest.append(track)
            if len(latest) > self.artist_tracks:
                del latest[0]

    # -- replication: item steps learned by other workers --------------------------------

    def apply_item_steps(self, steps: Iterable[ItemStepLike]) -> int:
        """Learn plays another recommender owned, on the item side only: trending,
        co-occurrence, SR, session-kNN, MF item factors, the skip model, the skip-rate
        detector, the artist map, first-seen times and the learned blend (when this
        recommender ranks with it) take the step the owner took (:class:`ItemStep`).
        Nothing about the listener is learned (their factors stay with their owner).
        Returns how many steps were applied. Steps must be validated
        input (``decode_batch`` of :mod:`stream.processing.replication`); a step whose
        factors or blend pairs do not fit this model raises ValueError before anything is
        learned from it. Blend rows made with another loss than this blend's
        (``blend_loss``) are left out (:meth:`takes_blend_rows`), the rest of the step
        applies."""
        n = 0
        learn_blend = self.blend == "learned"
        for s in steps:
            factors = s.factors
            if factors is not None and factors.shape != (self.n_factors,):
                raise ValueError(f"item step factors: shape {factors.shape}, "
                                 f"expected ({self.n_factors},)")
            pairs = s.blend_pairs
            if pairs is not None and (pairs.ndim != 2 or pairs.shape[1] != N_FEATURES):
                raise ValueError(f"item step blend pairs: shape {pairs.shape}, "
                                 f"expected (n, {N_FEATURES})")
            if pairs is not None and not usable_rows(pairs):
                raise ValueError("item step blend pairs: not finite or too large")
            position = s.position
            x = Interaction(
                user_id="", track_id=s.track_id, ts_ms=s.ts_ms, skipped=s.skipped,
                history=s.history, session_position=max(position, 0), context=s.context,
                artist_id=s.artist_id,
            )
            if s.skip_features:
                self.skip.learn_features(s.skip_features, s.skipped)
            self.drift.learn_one(x)
            self.popularity.learn_one(x)
            self.cooccurrence.learn_one(x)
            if factors is not None:
                self.mf.apply_item_step(factors, s.track_id, s.negatives, s.skipped)
            if s.artist_id:
                self._note_artist(s.track_id, s.artist_id)
            if self.session_models:
                if s.session:
                    self.session_knn.learn_play(s.session, s.track_id, s.ts_ms,
                                                max(position, 0))
                if position >= 0:
                    self.rules.learn_one(x)
                self._first_seen(s.track_id, s.ts_ms)
                if learn_blend and pairs is not None and s.blend_loss == self.ranker.loss:
                    with contextlib.suppress(ValueError):  # a weight beyond MAX_WEIGHT
                        self.ranker.apply_pairs(pairs)
            n += 1
        return n

    def takes_blend_rows(self, step: ItemStepLike) -> bool | None:
        """Whether :meth:`apply_item_steps` applies ``step``'s learned-blend rows: None
        when it has none or this recommender does not rank with the learned blend, False
        when they were made with another loss than this blend's (a mixed fleet during an
        upgrade, or another ``blend_params``)."""
        if step.blend_pairs is None or self.blend != "learned":
            return None
        return step.blend_loss == self.ranker.loss

    # -- partition-local listener state -----------------------------------------------------

    def export_user(self, user_id: str) -> str:
        """The listener's model state (MF factors, own history with ``repeats``) as a
        record of :mod:`stream.core.listener_record` ("" when there is none). Learning keeps
        it in :attr:`UserState.model` of the listener's session, so it moves with them."""
        own = self.own_history.get(user_id) if self.repeats else None
        return encode_listener_record(self.mf.export_user(user_id), list(own or ()))

    def import_user(self, user_id: str, record: str) -> bool:
        """Take a listener's model state from their record (after a rebalance or a
        restart: their session brought it). Returns whether it held anything; a record
        that is not a valid one for this model raises ValueError (nothing is changed)."""
        if not record:
            return False
        factors, own = decode_listener_record(record, n_factors=self.n_factors,
                                              max_own=255)
        if factors is not None:
            self.mf.import_user(user_id, factors)
        if own and self.repeats:
            self.own_history.pop(user_id, None)
            self.own_history[user_id] = dict.fromkeys(own[-self.repeats :])
            if self.max_users is not None and len(self.own_history) > self.max_users:
                del self.own_history[next(iter(self.own_history))]
        return factors is not None or bool(own)

    # -- ranking --------------------------------------------------------------------------

    def recommend(
        self,
        state: UserState,
        k: int,
        now_ms: int,
        *,
        exclude: Collection[str] = (),
        variant: str = "blend",
        context: str | None = None,
    ) -> list[Recommendation]:
        """Top-``k`` tracks for this listener now, never one of their last
        ``recent_filter`` tracks nor one in ``exclude``. ``variant`` ranks with one
        component alone (``popularity``, ``mf``, ``cooccurrence``) for evaluation. The skip
        model scores the tracks in ``context`` (the listening context), by default the
        listener's last play's (``state.last_context``); the learned blend always takes the
        last play's, the context its lists are learned in."""
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        if k <= 0:
            return []
        if variant in _SESSION_VARIANTS:
            return self._rank_session_model(state, k, now_ms, exclude, variant)
        if variant == "blend" and self.blend == "learned":
            return self._rank_learned(state, k, now_ms, exclude)
        fixed = variant in ("blend", "fixed")
        weights = self.blend_weights if fixed else {variant: 1.0}
        # Single-component variants are filled with trending when they run short.
        blend_weights = weights if fixed else {variant: 1.0, "popularity": 1e-6}
        if blend_weights.get("skip", 0.0) > 0:  # the skip penalty: the general path
            recent = state.recent[-self.recent_filter :] if self.recent_filter else []
            query = Interaction(
                user_id=state.user_id,
                ts_ms=now_ms,
                history=tuple(state.recent),
                session_position=state.session_plays,
                recent_skip_rate=_recent_skip_rate(state),
                context=context if context is not None else (state.last_context or None),
            )
            banned: Iterable[str] | tuple[Iterable[str], SeenTracks] = (
                (recent, exclude) if isinstance(exclude, SeenTracks) else chain(recent, exclude)
            )
            anchors = self.cooccurrence.anchors(query.history)
            return self._rank_reference(query, k, banned, weights, blend_weights, anchors)
        return self._rank_compiled(state, k, exclude, weights, blend_weights)

    def recommend_many(
        self, states: Sequence[UserState], k: int, now_ms: int
    ) -> list[list[Recommendation]]:
        """``[self.recommend(state, k, now_ms) for state in states]`` (the blend, nothing
        excluded), with every listener ranked in one compiled call
        (:func:`stream.core.models._kernels.rank_many`)."""
        return cast(list[list[Recommendation]], self._rank_many(states, k, now_ms, True))

    def rank_items_many(
        self, states: Sequence[UserState], k: int, now_ms: int
    ) -> list[list[RankedItem]]:
        """:meth:`recommend_many` for documents (the worker ranks each pass's listeners
        this way): the same tracks, scores, codes and anchors, as plain tuples whose reason
        is None where it names the anchor (:data:`stream.core.ranking.RankedItem`;
        :meth:`stream.core.catalog.TrackCatalog.items` names it by the track's title), so
        no :class:`Recommendation` and no id-named reason is built per item."""
        return self._rank_many(states, k, now_ms, False)

    def _rank_many(
        self, states: Sequence[UserState], k: int, now_ms: int, reasons: bool
    ) -> list[list[RankedItem]]:
        """The batched ranking of :meth:`recommend_many` (``reasons``) or
        :meth:`rank_items_many`."""
        if k <= 0 or not states:
            return [[] for _ in states]
        weights = self.blend_weights
        if weights.get("skip", 0.0) > 0 or len(states) == 1 or self.blend == "learned":
            return [list(self.recommend(state, k, now_ms)) for state in states]
        size = len(self.vocabulary)
        if size == 0:
            return [[] for _ in states]
        n = max(self.candidates_per_source, k)
        n_pop = n if weights.get("popularity", 0.0) > 0 else k
        cooc = self.cooccurrence
        m = len(states)
        hist: list[int] = []
        hist_off = np.zeros(m + 1, dtype=np.int64)
        bans: list[int] = []
        ban_off = np.zeros(m + 1, dtype=np.int64)
        factors = self.mf.factors()
        users = np.zeros((m, factors.shape[1]), dtype=factors.dtype)
        has_user = np.zeros(m, dtype=np.bool_)
        use_mf = weights.get("mf", 0.0) > 0
        for q, state in enumerate(states):
            hist_rows, ban_recent = self._query_rows(state)
            hist += hist_rows
            hist_off[q + 1] = len(hist)
            bans += ban_recent
            ban_off[q + 1] = len(bans)
            if use_mf:
                user = self._user_vector(state)
                if user is not None:
                    users[q] = user
                    has_user[q] = True
        width = n_pop + 2 * n
        out_rows = np.empty((m, width), dtype=np.int64)
        out_totals = np.empty((m, width))
        out_reasons = np.empty((m, width), dtype=np.int64)
        out_leads = np.empty((m, width), dtype=np.int64)
        out_count = np.zeros(m, dtype=np.int64)
        members, pop_weights, pop_total = self.popularity.ranking_inputs(size)
        start, csize, cap, total, nbr, val = cooc.arena()
        with self._query_buffers(size) as (ban, sc):
            _k.rank_many(
                size, n_pop, n,
                weights.get("cooccurrence", 0.0) > 0,
                self.mf_candidates or weights.get("cooccurrence", 0.0) == 0,
                weights.get("popularity", 0.0),
                weights.get("cooccurrence", 0.0),
                weights.get("mf", 0.0),
                members, pop_weights, pop_total,
                start, csize, cap, total, nbr, val,
                np.array(hist, dtype=np.int64), hist_off, cooc.query_decay,
                sc.acc, sc.best, sc.anchor, sc.touched,
                factors, users, has_user, ban, self._mark_buffer(size),
                np.array(bans, dtype=np.int64), ban_off,
                out_rows, out_totals, out_reasons, out_leads, out_count,
            )
        # every listener's prefix (the candidates _results reads first) as Python lists in
        # one conversion per array, not four slices and conversions per listener
        cap_n = self.max_per_artist if self.artist_of else None
        stop = min(width, k if cap_n is None else 2 * k)
        prefix_totals = np.ascontiguousarray(out_totals[:, :stop])
        prefixes = zip(out_rows[:, :stop].tolist(),
                       _k.round6(prefix_totals.reshape(-1)).reshape(m, stop).tolist(),
                       prefix_totals.tolist(), out_reasons[:, :stop].tolist(),
                       out_leads[:, :stop].tolist(), strict=True)
        arrays = (out_rows, out_totals, out_reasons, out_leads)
        return [
            self._results_from(arrays, q, c, k, cap_n, min(c, stop),
                               (rows[:c], rounded[:c], raw[:c], codes[:c], leads[:c]),
                               reasons)
            for q, (c, (rows, rounded, raw, codes, leads))
            in enumerate(zip(out_count.tolist(), prefixes, strict=True))
        ]

    # -- learned blend and session models ----------------------------------------------------

    def _learn_blend(self, before: UserState, track: str, ts_ms: int
                     ) -> Float32Array | None:
        """Learn the blend from this play; its step (the example rows), None if none."""
        cache = self.__dict__.pop("_blend_cache", None)
        order = None
        if cache is not None and cache[0] == before.user_id and cache[1] == before.seq:
            rows, X = cache[2], cache[3]
            if cache[5] is self.ranker.weights_token:  # no step since: the same order
                order = cache[4]
        else:  # not ranked just before (the worker ranks after learning): rank now
            rows, X, *_ = self._blend_candidates(before, ts_ms, ())
        row = self.vocabulary.index.get(track)
        if row is None or not len(rows):
            return None
        if self.ranker.loss == "softmax":  # the step row, then the step: one compiled call
            return self.ranker.learn_played(rows, row, X)
        hit = np.flatnonzero(rows == row)
        if not len(hit):
            return None
        # only finite rows within MAX_ROW_VALUE (what a receiver takes), else none
        pairs = self.ranker.pairs(X, int(hit[0]), key=self.n_learned, order=order)
        if not len(pairs):
            return None
        try:
            self.ranker.apply_pairs(pairs)
        except ValueError:  # the step would take a weight beyond MAX_WEIGHT: not taken
            return None
        return pairs

    def _session_items(self, state: UserState) -> list[str]:
        """The listener's current session, oldest first (the last track at least), or all
        their recent tracks with ``session_scope="recent"``."""
        if self.session_scope == "recent":
            return state.recent
        n = max(min(state.session_plays, len(state.recent)), 1)
        return state.recent[-n:]

    def _banned_rows(self, state: UserState, exclude: Collection[str],
                     recent_rows: IntArray | None = None) -> IntArray:
        """Rows nobody may recommend to ``state`` now: its last ``recent_filter`` tracks
        (from ``recent_rows``, :meth:`_recent_rows`, when given) and ``exclude``."""
        if recent_rows is None:
            ban_list = self._query_rows(state)[1]
            recent = np.array(ban_list, dtype=np.int64) if ban_list else _NO_ROWS
        else:
            keep = min(self.recent_filter, len(recent_rows))
            recent = recent_rows[len(recent_rows) - keep:] if keep else _NO_ROWS
        if not exclude:
            return recent[recent >= 0]
        rows = np.concatenate((recent, self._exclude_rows(exclude)))
        # rows of another vocabulary (a foreign SeenTracks) may lie past this catalogue:
        # the compiled session rankings set bans without bounds checks (review17b)
        out: IntArray = rows[(rows >= 0) & (rows < len(self.vocabulary))]
        return out

    def _exclude_rows(self, exclude: Collection[str]) -> IntArray:
        """The vocabulary rows of the known tracks of ``exclude``."""
        if isinstance(exclude, SeenTracks):
            return exclude.rows()
        if not exclude:
            return _NO_ROWS
        get = self.vocabulary.index.get
        return np.fromiter((r for r in map(get, exclude) if r is not None), np.int64)

    def _recent_rows(self, state: UserState) -> IntArray:
        """The vocabulary rows (-1 = unknown) of as many of the listener's recent tracks,
        oldest first, as the learned blend's queries and bans read."""
        span = max(self.recent_filter, self.cooccurrence.query_window,
                   self.blend_cooc_window, self.rules.query_window,
                   self.session_knn.query_window)
        shards = self.vocabulary.index.shards  # index.get, inlined (stream.core.shards)
        return np.array([shards[hash(t) & SHARD_MASK].get(t, -1) for t in state.recent[-span:]],
                        dtype=np.int64)

    def _blend_candidates(
        self, state: UserState, now_ms: int, exclude: Collection[str]
    ) -> tuple[IntArray, FloatArray, FloatArray, IntArray]:
        """Every component's best ``blend_candidates`` tracks (none banned), and per
        candidate the feature row of :data:`stream.core.models.blend.FEATURES`; also each
        source's score of each candidate (:func:`_bk.blend_collect`'s ``comp``: columns
        co-occurrence, STAN, SR, artist, own history, long co-occurrence) and
        co-occurrence's lead (for reasons)."""
        cands, comp, lead, X, feature_args = self._blend_inputs(state, now_ms, exclude)
        if len(cands):  # popularity, the skip model's prediction and the features
            _bk.blend_matrix(cands, comp, *feature_args, X)
        return cands, X, comp, lead

    def _blend_inputs(
        self, state: UserState, now_ms: int, exclude: Collection[str],
        share: _VariantShare | None = None,
    ) -> tuple[IntArray, FloatArray, IntArray, FloatArray, tuple[Any, ...]]:
        """The candidates, their sources' scores and leads (:meth:`_blend_candidates`),
        their feature rows to fill (``len(cands) x N_FEATURES``) and
        :func:`_bk.blend_matrix`'s arguments between those (empty without candidates)."""
        size = len(self.vocabulary)
        if size == 0:
            return _NO_ROWS, np.zeros((0, 6)), _NO_ROWS, np.zeros((0, N_FEATURES)), ()
        cands, comp, lead, last = self._blend_sources(state, now_ms, self._recent_rows(state),
                                                      exclude, size, share)
        user = self._user_vector(state)
        # take(): the same rows as factors[cands], without fancy indexing's ~2 us set-up
        mf = (self.mf.factors().take(cands, axis=0) @ user).astype(np.float64) \
            if user is not None else np.zeros(len(cands))
        skip_terms = self.skip.logit_terms_at(now_ms, state.session_plays,
                                              _recent_skip_rate(state),
                                              state.last_context or None)
        same_artist, recent_artist = self._artist_columns(state, cands)
        w = self.blend_weights
        pop_w, pop_total = self.popularity.score_inputs()
        return cands, comp, lead, np.empty((len(cands), N_FEATURES)), (
            pop_w, pop_total, mf, *skip_terms, same_artist, recent_artist,
            self.first_seen, now_ms, math.log1p(state.plays_total) / 5.0,
            w.get("cooccurrence", 0.0), w.get("mf", 0.0), w.get("popularity", 0.0), _DAY_MS,
            last)

    def _artist_columns(self, state: UserState, cands: IntArray) -> tuple[FloatArray, FloatArray]:
        """Per candidate: 1.0 if its artist is the last play's (``same_artist``), and its
        artist's share of the listener's last ``ARTIST_WINDOW`` plays with a known artist,
        each play weighted ``ARTIST_DECAY ** (plays since)`` (``recent_artist``); both 0 for
        a candidate without a known artist."""
        m = len(cands)
        if not state.recent or not self.artist_of:  # a log without artists: no lookups
            return np.zeros(m), np.zeros(m)
        shards = self.artist_of.shards  # artist_of.get, inlined
        weight: dict[str, float] = {}
        total = 0.0
        w = 1.0
        for t in reversed(state.recent[-ARTIST_WINDOW:]):
            a = shards[hash(t) & SHARD_MASK].get(t)
            if a is not None:
                weight[a] = weight.get(a, 0.0) + w
                total += w
            w *= ARTIST_DECAY
        if not total:
            return np.zeros(m), np.zeros(m)
        last_artist = shards[hash(state.recent[-1]) & SHARD_MASK].get(state.recent[-1])
        ids = self.vocabulary.ids
        artists = [shards[hash(t) & SHARD_MASK].get(t)
                   for t in map(ids.__getitem__, cands.tolist())]
        get = weight.get
        share = np.fromiter((get(a, 0.0) if a is not None else 0.0 for a in artists),
                            np.float64, m) / total
        if last_artist is None:
            return np.zeros(m), share
        return np.fromiter(map(operator.eq, artists, repeat(last_artist)), np.float64, m), share

    def _last_play_scores(self, state: UserState, cands: IntArray, size: int) -> FloatArray:
        """Per candidate, its weight in the sequential rules and in the co-occurrence
        neighbours of the listener's last play alone (columns 0 and 1; the blend's
        ``*_last`` features)."""
        last = np.empty((len(cands), 2))
        row = self.vocabulary.index.get(state.recent[-1], -1) if state.recent else -1
        dense = self.__dict__.get("_last_dense")
        if dense is None or len(dense) < size:
            dense = self.__dict__["_last_dense"] = np.zeros(max(size, 64) * 2)
        for col, model in enumerate((self.rules, self.cooccurrence)):
            start, n, _cap, total, nbr, val = model.arena()
            _k.last_play_scores(start, n, total, nbr, val, row, cands, dense, last, col)
        return last

    def _blend_sources(
        self, state: UserState, now_ms: int, recent: IntArray, exclude: Collection[str],
        size: int, share: _VariantShare | None = None,
    ) -> tuple[IntArray, FloatArray, IntArray, FloatArray]:
        """The candidates, each source's score of them, co-occurrence's lead and the last
        play's own SR and co-occurrence scores of them (:meth:`_last_play_scores`), none of
        them banned (the last ``recent_filter`` of ``recent``, :meth:`_recent_rows`, and
        ``exclude``): one compiled call (:func:`_bk.blend_collect`: the bans, trending's top
        set, every query, STAN's included, the gathering) after the Python-side sources
        (artist, own history)."""
        artist, own = self._artist_source(state), self._own_source(state)
        if self.cooccurrence.pop_penalty > 0 or self.rules.pop_penalty > 0:
            return self._blend_sources_penalised(state, now_ms, recent, exclude, artist, own,
                                                 size)
        n_ban = min(self.recent_filter, len(recent))
        other = self._exclude_rows(exclude)
        members, weights, _ = self.popularity.ranking_inputs(size)
        sc = self.cooccurrence.acquire_scratch(size)
        try:
            rest = self._collect_inputs(state, now_ms, recent, artist, own, sc, size)
            collect = _bk.blend_collect if share is None else share.collect
            cands, comp, lead, last, unique = collect(
                recent, n_ban, other, members, weights, _NO_ROWS, False, size, *rest)
            if not unique:  # a tie at trending's cut: numpy's choice (top_set), then again
                top = self._banned_top_set(self._banned_rows(state, exclude, recent), size)
                cands, comp, lead, last, _ = collect(
                    recent, n_ban, other, members, weights, top, True, size, *rest)
        except BaseException:
            sc.clear()
            self.session_knn.clear_scratch()
            self._ban_buffer(size).fill(False)
            raise
        finally:
            self.cooccurrence.release_scratch(sc)
        return cands, comp, lead, last

    def _collect_inputs(
        self, state: UserState, now_ms: int, recent: IntArray,
        artist: tuple[IntArray, FloatArray], own: tuple[IntArray, FloatArray], sc: Any,
        size: int,
    ) -> tuple[Any, ...]:
        """:func:`_bk.blend_collect`'s arguments after the bans and the top set."""
        cooc, rules, knn = self.cooccurrence, self.rules, self.session_knn
        # the session's length (_session_items without the list): STAN queries its last
        # query_window tracks, SR its last rules.query_window, both from ``recent``
        n_recent = len(state.recent)
        n_session = n_recent if self.session_scope == "recent" \
            else min(max(state.session_plays, 1), n_recent)
        dense = self.__dict__.get("_last_dense")
        if dense is None or len(dense) < size:
            dense = self.__dict__["_last_dense"] = np.zeros(max(size, 64) * 2)
        # float(): an int decay (the Python API accepts 1) would compile a second
        # signature of the kernel at the first ranking, after warm_up
        return (*cooc.arena(), cooc.query_window, float(cooc.query_decay),
                self.blend_cooc_window, float(self.blend_cooc_decay), *rules.arena(),
                min(rules.query_window, n_session), float(rules.query_decay), n_session,
                knn.query_window, *knn.query_inputs(session_token(state), now_ms, len(recent)),
                *artist, *own, self._ban_buffer(size), self._mark_buffer(size), sc.acc,
                sc.best, sc.anchor, sc.touched, self._pos_buffer(size), dense,
                self.blend_candidates)

    def _banned_top_set(self, ban_rows: IntArray, size: int) -> IntArray:
        """Trending's top set (``DecayedPopularity.top_set``) with ``ban_rows`` banned."""
        ban = self._ban_buffer(size)
        ban[ban_rows] = True
        try:
            return self.popularity.top_set(self.blend_candidates, ban)
        finally:
            ban[ban_rows] = False

    def _blend_sources_penalised(
        self, state: UserState, now_ms: int, recent: IntArray, exclude: Collection[str],
        artist: tuple[IntArray, FloatArray], own: tuple[IntArray, FloatArray], size: int,
    ) -> tuple[IntArray, FloatArray, IntArray, FloatArray]:
        """:meth:`_blend_sources` through :meth:`_blend_sources_python` (the compiled
        queries have no popularity penalty)."""
        ban_rows = self._banned_rows(state, exclude, recent)
        ban = self._ban_buffer(size)
        ban[ban_rows] = True
        try:
            session = self._session_items(state)
            cands, comp, lead = self._blend_sources_python(
                state, session, self.session_knn.score(session, session_token(state), now_ms),
                artist, own, self.popularity.top_set(self.blend_candidates, ban), ban, size)
        finally:
            ban[ban_rows] = False
        return cands, comp, lead, self._last_play_scores(state, cands, size)

    def _blend_sources_python(
        self, state: UserState, session: list[str], stan: tuple[IntArray, FloatArray],
        artist: tuple[IntArray, FloatArray], own: tuple[IntArray, FloatArray],
        top: IntArray, ban: BoolArray, size: int,
    ) -> tuple[IntArray, FloatArray, IntArray]:
        """:meth:`_blend_sources`' co-occurrence and SR queries through the models' own
        methods (which apply a popularity penalty): the reference of the compiled call."""
        cooc, rules = self.cooccurrence, self.rules
        with cooc.accumulate(cooc.anchors(state.recent)) as touched:
            c_rows = touched.rows().copy()
            c_vals = touched.scratch.acc[c_rows]
            c_lead = touched.scratch.anchor[c_rows]
        l_rows, l_vals = _NO_ROWS, _NO_SCORES
        if self.blend_cooc_window:  # the long view: more of the listener's history
            anchors = cooc.anchors(state.recent, self.blend_cooc_window, self.blend_cooc_decay)
            with cooc.accumulate(anchors) as t3:
                l_rows = t3.rows().copy()
                l_vals = t3.scratch.acc[l_rows]
        with rules.accumulate(rules.anchors(session)) as t2:
            r_rows = t2.rows().copy()
            r_vals = t2.scratch.acc[r_rows]
        sources = (c_rows, stan[0], r_rows, artist[0], own[0], l_rows)
        offsets = np.zeros(len(sources) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(rows) for rows in sources])
        cands, comp, lead = _k.blend_gather(
            np.concatenate(sources),
            np.concatenate((c_vals, stan[1], r_vals, artist[1], own[1], l_vals)),
            offsets, c_lead, top, ban, self._mark_buffer(size), self._pos_buffer(size),
            self.blend_candidates)
        return cands, comp, lead

    def _rank_learned(
        self, state: UserState, k: int, now_ms: int, exclude: Collection[str]
    ) -> list[Recommendation]:
        ranked = self._learned_order(state, now_ms, exclude)
        if ranked is None:
            return self.recommend(state, k, now_ms, exclude=exclude, variant="fixed")
        rows, scores, codes, leads = ranked
        if self.tracks_of:  # (empty: no artist source, so no artist reasons)
            by_artist = np.flatnonzero(codes == REASON_ARTIST)
            if len(by_artist):
                self._artist_leads(state, rows, by_artist, leads)
        return self._results(rows, scores, codes, leads, k)

    def _learned_order(
        self, state: UserState, now_ms: int, exclude: Collection[str],
        share: _VariantShare | None = None,
    ) -> tuple[IntArray, FloatArray, IntArray, IntArray] | None:
        """The learned blend's candidates in ranked order: rows, scores, reason codes and
        leads (co-occurrence's; an artist reason's lead is the caller's); kept for
        :meth:`_learn_blend`. None at a cold start (the fixed blend ranks then)."""
        if not state.recent:
            # Cold start: a listener without plays gets the fixed blend (trending, MF if
            # they have factors). The learned model never trains on such lists (a play
            # teaches only the list ranked for a listener with history), and ranked by it
            # the trending-only candidates came out in a worse order: on the first 30,000
            # MovieLens plays, first plays scored HR@10 0.063 against trending's 0.192.
            self.__dict__.pop("_blend_cache", None)
            return None
        rows, comp, lead, X, feature_args = self._blend_inputs(state, now_ms, exclude, share)
        if not len(rows):
            self.__dict__["_blend_cache"] = (state.user_id, state.seq, rows, X, None, None)
            return rows, _NO_SCORES, _NO_ROWS, _NO_ROWS
        last = self.vocabulary.index.get(state.recent[-1], -1) if state.recent else -1
        # the features, scores, and the candidates, scores, reasons and leads in ranked
        # order in one compiled call (X keeps the candidates' order: learning reads it
        # with ``rows``)
        order, ranked, scores, codes, leads = _bk.blend_rank(
            rows, comp, lead, *feature_args, X, *self.ranker.score_inputs(X.shape[1]), last)
        self.__dict__["_blend_cache"] = (state.user_id, state.seq, rows, X, order,
                                         self.ranker.weights_token)
        return ranked, scores, codes, leads

    def _artist_leads(self, state: UserState, ranked: IntArray, by_artist: IntArray,
                      leads: IntArray) -> None:
        """The leads of the ranked candidates ``by_artist`` (reason: the artist source):
        the listener's recent play by that artist (most recent first), -1 if none."""
        artist_of, get, ids = self.artist_of, self.vocabulary.index.get, self.vocabulary.ids
        played: dict[str, int] = {}
        for t in state.recent[-1:-3:-1]:
            a = artist_of.get(t)
            r = get(t)
            if a is not None and r is not None:
                played.setdefault(a, r)
        shards = artist_of.shards  # artist_of.get, inlined
        for i in by_artist.tolist():
            t = ids[int(ranked[i])]
            a = shards[hash(t) & SHARD_MASK].get(t)
            leads[i] = played.get(a, -1) if a is not None else -1

    def _rank_session_model(
        self, state: UserState, k: int, now_ms: int, exclude: Collection[str], variant: str
    ) -> list[Recommendation]:
        """One session model alone (``sknn``, ``stan``, ``sr``), filled with trending."""
        rows, scores, from_model = self._session_ranking(state, k, now_ms, exclude, variant)
        last = self.vocabulary.index.get(state.recent[-1], -1) if state.recent else -1
        code = _k.REASON_COOCCURRENCE if variant == "sr" else _k.REASON_MF
        codes = np.where(from_model, code, _k.REASON_POPULARITY).astype(np.int64)
        leads = np.full(len(rows), last, dtype=np.int64)
        return self._results(rows, scores, codes, leads, k)

    def _session_ranking(
        self, state: UserState, k: int, now_ms: int, exclude: Collection[str], variant: str
    ) -> tuple[IntArray, FloatArray, BoolArray]:
        """The ranked rows of one session model alone, their scores and whether each came
        from the model (else trending): :meth:`_session_lists` of that variant."""
        return self._session_lists(state, k, now_ms, exclude, (variant,))[variant]

    def _session_lists(
        self, state: UserState, k: int, now_ms: int, exclude: Collection[str],
        variants: Collection[str],
    ) -> dict[str, tuple[IntArray, FloatArray, BoolArray]]:
        """:meth:`_session_ranking` of those of ``variants`` that are session models, in
        compiled calls (:mod:`._session_kernels`; ``sknn`` and ``stan`` together from one
        pass over their neighbour sessions): the same lists as
        :meth:`_rank_session_reference`, which SR with a popularity penalty still takes.
        Where ties at a cut leave a choice, numpy makes it (:meth:`_finish_session`)."""
        wanted = [v for v in ("stan", "sknn", "sr") if v in variants]
        size = len(self.vocabulary)
        if size == 0 or (self.rules.pop_penalty > 0 and "sr" in wanted):
            return {v: self._rank_session_reference(state, k, now_ms, exclude, v)
                    for v in wanted}
        recent = self._recent_rows(state)
        ban_rows = self._banned_rows(state, exclude, recent)
        n_recent = len(state.recent)
        n_session = n_recent if self.session_scope == "recent" \
            else min(max(state.session_plays, 1), n_recent)
        members, pop_w, pop_total = self.popularity.ranking_inputs(size)
        fill_args = (self._ban_buffer(size), ban_rows, 3 * k, members, pop_w,
                     pop_total or 1.0, size)
        outcomes: dict[str, _Outcome] = {}
        if "sr" in wanted:
            outcomes["sr"] = self._rank_rules(recent, n_session, size, fill_args)
        if "stan" in wanted or "sknn" in wanted:
            which = 2 if "stan" in wanted and "sknn" in wanted else int("sknn" in wanted)
            outcomes["stan"], outcomes["sknn"] = self._rank_knn(
                state, now_ms, recent, n_session, which, size, fill_args)
        return {v: self._finish_session(outcomes[v], fill_args) for v in wanted}

    def _rank_knn(
        self, state: UserState, now_ms: int, recent: IntArray, n_session: int, which: int,
        size: int, fill_args: tuple[Any, ...],
    ) -> tuple[_Outcome, ...]:
        """:func:`_sk.rank_stan` (``which``: 0 STAN, 1 SKNN, 2 both), scratch restored if
        it raises."""
        knn = self.session_knn
        n_query = min(knn.query_window, n_session)
        acc2, touched2 = self._knn_pair_scratch(size)
        try:
            out: tuple[_Outcome, ...] = _sk.rank_stan(
                recent, n_query, which,
                *knn.query_inputs(session_token(state), now_ms, n_query), acc2, touched2,
                *fill_args)
        except BaseException:
            knn.clear_scratch()
            acc2[:] = 0.0
            fill_args[0][:] = False
            raise
        return out

    def _knn_pair_scratch(self, size: int) -> tuple[FloatArray, IntArray]:
        """The plain (SKNN) query's scratch when STAN's pass scores both
        (:func:`_sk.knn_scores`): all zero, left so by the kernels."""
        acc2 = self.__dict__.get("_knn_acc2")
        if acc2 is None or len(acc2) < size:
            cap = max(size, 2 * (0 if acc2 is None else len(acc2)), 64)
            acc2 = self.__dict__["_knn_acc2"] = np.zeros(cap)
            self.__dict__["_knn_touched2"] = np.zeros(cap, dtype=np.int64)
        return acc2, self.__dict__["_knn_touched2"]

    def _finish_session(
        self, outcome: _Outcome, fill_args: tuple[Any, ...]
    ) -> tuple[IntArray, FloatArray, BoolArray]:
        """A compiled session ranking's list; where it stopped at a cut with tied tracks
        (:data:`_sk.NEED_MODEL_CUT`, :data:`_sk.NEED_FILL`), numpy's choice and the rest
        (``fill_args``' ban rows are read only for NEED_FILL)."""
        status, rows, vals, flags, fill = outcome
        if status == _sk.DONE:
            return rows, vals, flags
        ban, ban_rows, room, _members, pop_w, pop_div, _size = fill_args
        if status & _sk.NEED_MODEL_CUT:  # numpy's choice among the tracks tied at the cut
            sel = np.argpartition(-vals, room - 1)[:room]
            rows, vals = rows[sel], vals[sel]
        if status & _sk.NEED_FILL:
            ban[ban_rows] = True
            try:
                fill = self.popularity.top_set(room, ban)
            finally:
                ban[ban_rows] = False
        ranked: tuple[IntArray, FloatArray, BoolArray] = _sk.session_order(
            rows, vals, fill, pop_w, pop_div)
        return ranked

    def _rank_rules(
        self, recent: IntArray, n_session: int, size: int, fill_args: tuple[Any, ...]
    ) -> _Outcome:
        """:func:`_sk.rank_sr` of the sequential rules (their scratch held and released)."""
        rules = self.rules
        sc = rules.acquire_scratch(size)
        try:
            out: _Outcome = _sk.rank_sr(
                recent, min(rules.query_window, n_session), float(rules.query_decay),
                *rules.arena(), sc.acc, sc.best, sc.anchor, sc.touched, *fill_args)
        except BaseException:
            sc.clear()
            fill_args[0][:] = False
            raise
        finally:
            rules.release_scratch(sc)
        return out

    def _rank_session_reference(
        self, state: UserState, k: int, now_ms: int, exclude: Collection[str], variant: str
    ) -> tuple[IntArray, FloatArray, BoolArray]:
        """:meth:`_session_ranking` in numpy, through the models' own queries."""
        size = len(self.vocabulary)
        if size == 0:
            return _NO_ROWS, _NO_SCORES, np.zeros(0, dtype=np.bool_)
        session = self._session_items(state)
        if variant == "sr":
            with self.rules.accumulate(self.rules.anchors(session)) as touched:
                rows = touched.rows().copy()
                vals = touched.scratch.acc[rows]
        else:
            rows, vals = self.session_knn.score(session, session_token(state), now_ms,
                                                plain=variant == "sknn")
        ban_rows = self._banned_rows(state, exclude)
        ban = self._ban_buffer(size)
        ban[ban_rows] = True
        try:
            ok = (vals > 0) & ~ban[rows]
            rows, vals = rows[ok], vals[ok]
            room = 3 * k
            if len(rows) > room:
                sel = np.argpartition(-vals, room - 1)[:room]
                rows, vals = rows[sel], vals[sel]
            fill = self.popularity.top_set(room, ban)
        finally:
            ban[ban_rows] = False
        fill = fill[~np.isin(fill, rows)]
        all_rows = np.concatenate((rows, fill))
        scores = np.concatenate((_scale(vals), np.zeros(len(fill))))
        scores += 1e-6 * _scale(self.popularity.score_rows(all_rows))
        order = np.lexsort((all_rows, -scores))
        return all_rows[order], scores[order], order < len(rows)

    def _artist_source(self, state: UserState) -> tuple[IntArray, FloatArray]:
        """The latest tracks of the artists of the last two plays: score 1 / (1 + how many
        newer tracks the artist has), halved for the older play's artist."""
        if not self.artist_tracks or not state.recent:
            return _NO_ROWS, _NO_SCORES
        artists: list[str] = []
        for t in state.recent[-1:-3:-1]:
            a = self.artist_of.get(t)
            if a is not None and a not in artists:
                artists.append(a)
        get = self.vocabulary.index.get
        rows: list[int] = []
        vals: list[float] = []
        for weight, artist in zip((1.0, 0.5), artists, strict=False):
            for i, t in enumerate(reversed(self.tracks_of.get(artist, ()))):
                r = get(t)
                if r is not None:
                    rows.append(r)
                    vals.append(weight / (1 + i))
        if not rows:
            return _NO_ROWS, _NO_SCORES
        return np.array(rows, dtype=np.int64), np.array(vals)

    def _own_source(self, state: UserState) -> tuple[IntArray, FloatArray]:
        """The listener's own earlier tracks (repeats option), most recent first."""
        own = self.own_history.get(state.user_id) if self.repeats else None
        if not own:
            return _NO_ROWS, _NO_SCORES
        get = self.vocabulary.index.get
        rows = [r for r in map(get, reversed(own)) if r is not None]
        if not rows:
            return _NO_ROWS, _NO_SCORES
        return np.array(rows, dtype=np.int64), 1.0 / np.arange(1, len(rows) + 1)

    def _pos_buffer(self, size: int) -> IntArray:
        """Per-track scratch of :func:`_k.blend_gather`: a candidate index (all -1)."""
        buf: IntArray | None = self.__dict__.get("_pos")
        if buf is None or len(buf) < size:
            cap = max(size, 2 * (0 if buf is None else len(buf)), 64)
            buf = self.__dict__["_pos"] = np.full(cap, -1, dtype=np.int64)
        return buf

    def _query_rows(self, state: UserState) -> tuple[list[int], list[int]]:
        """A listener's recent tracks as vocabulary rows (-1 = unknown): the history that
        seeds co-occurrence, and the ones banned from their list."""
        cooc = self.cooccurrence
        shards = self.vocabulary.index.shards  # index.get, inlined (stream.core.shards)
        span = max(self.recent_filter, cooc.query_window)
        recent = ([shards[hash(t) & SHARD_MASK].get(t, -1) for t in state.recent[-span:]]
                  if span else [])
        hist = recent[len(recent) - min(cooc.query_window, len(recent)) :]
        banned = (recent[len(recent) - min(self.recent_filter, len(recent)) :]
                  if self.recent_filter else [])
        return hist, banned

    def _user_vector(self, state: UserState) -> Float32Array | None:
        user = self.mf.user_factors.get(state.user_id)
        if user is None and state.model:  # held by their session, not loaded yet
            with contextlib.suppress(ValueError):
                user = decode_listener_record(state.model, n_factors=self.n_factors,
                                              max_own=255)[0]
        if user is None:  # a listener without factors yet: their recent tracks' mean
            user = self.mf.user_vector(Interaction(user_id=state.user_id,
                                                   history=tuple(state.recent)))
        return user

    def _rank_compiled(
        self,
        state: UserState,
        k: int,
        exclude: Collection[str],
        weights: Mapping[str, float],
        blend_weights: Mapping[str, float],
    ) -> list[Recommendation]:
        """:meth:`_rank_reference` (without the skip penalty) in one compiled call
        (:func:`stream.core.models._kernels.rank_query`): bans, co-occurrence from the recent
        tracks, candidates, normalised blend, order and reasons. Python looks up the recent
        tracks' rows, applies the artist cap to the first tracks and builds the K results."""
        size = len(self.vocabulary)
        if size == 0:
            return []
        ban_other = self._exclude_rows(exclude)
        query = self._compiled_query(state, size)
        user = self._user_vector(state) if weights.get("mf", 0.0) > 0 else None
        with self._query_buffers(size) as buffers:
            ranked = self._rank_query(query, k, weights, blend_weights, user, buffers,
                                      ban_other)
        return self._results(*ranked, k)

    def _compiled_query(self, state: UserState, size: int) -> tuple[Any, ...]:
        """What every compiled query of ``state`` passes to the kernel, whatever it ranks
        with: the history and banned rows, and the models' arrays."""
        hist_list, ban_list = self._query_rows(state)
        return (size, np.array(hist_list, dtype=np.int64),
                np.array(ban_list, dtype=np.int64) if ban_list else _NO_ROWS,
                self.popularity.ranking_inputs(size), self.cooccurrence.arena(),
                self.mf.factors())

    def _rank_query(
        self,
        query: tuple[Any, ...],
        k: int,
        weights: Mapping[str, float],
        blend_weights: Mapping[str, float],
        user: Float32Array | None,
        buffers: tuple[BoolArray, Any],
        ban_other: IntArray | None = None,
    ) -> tuple[IntArray, FloatArray, IntArray, IntArray]:
        """One :func:`stream.core.models._kernels.rank_query` call of a prepared query."""
        size, hist_rows, ban_recent, (members, pop_weights, pop_total), arena, factors = query
        start, csize, cap, total, nbr, val = arena
        n = max(self.candidates_per_source, k)
        ban, sc = buffers
        ranked: tuple[IntArray, FloatArray, IntArray, IntArray] = _k.rank_query(
            size,
            n if weights.get("popularity", 0.0) > 0 else k,
            n,
            weights.get("cooccurrence", 0.0) > 0,
            user is not None,
            self.mf_candidates or weights.get("cooccurrence", 0.0) == 0,
            blend_weights.get("popularity", 0.0),
            blend_weights.get("cooccurrence", 0.0),
            blend_weights.get("mf", 0.0),
            members,
            pop_weights,
            pop_total,
            start, csize, cap, total, nbr, val,
            hist_rows,
            float(self.cooccurrence.query_decay),
            sc.acc, sc.best, sc.anchor, sc.touched,
            factors,
            user if user is not None else _NO_SCORES,
            ban,
            self._mark_buffer(size),
            ban_recent,
            _NO_ROWS if ban_other is None else ban_other,
        )
        return ranked

    def component_ids(
        self, state: UserState, k: int, now_ms: int, variants: Sequence[str], *,
        exclude: Collection[str] = (),
    ) -> list[list[str]]:
        """``[[r.track_id for r in self.recommend(state, k, now_ms, exclude=exclude,
        variant=v)] for v in variants]`` without a :class:`Recommendation` (nor its reason)
        per item: the live per-component quality
        (:class:`stream.core.evaluation.ComponentQuality`, on the hot path). The ids of
        :meth:`component_rows`."""
        ids = self.vocabulary.ids
        return [[ids[r] for r in rows]
                for rows in self.component_rows(state, k, now_ms, variants, exclude=exclude)]

    def component_rows(
        self, state: UserState, k: int, now_ms: int, variants: Sequence[str], *,
        exclude: Collection[str] = (),
    ) -> list[list[int]]:
        """:meth:`component_ids` as vocabulary rows (the replay's evaluation of every
        variant, :meth:`stream.core.evaluation.Prequential.observe_rows`: no track id per
        list). The single components (``popularity``, ``mf``, ``cooccurrence``) and the
        fixed blend share one prepared query and one compiled call; ``sknn``, ``stan`` and
        ``sr`` take one compiled call each; the learned blend ranks as :meth:`recommend`
        does (with the others from its collection's call, :meth:`_shared_rows`)."""
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; expected from {VARIANTS}")
        if k <= 0:
            return [[] for _ in variants]
        out = self._shared_rows(state, k, now_ms, exclude, variants)
        rest = [v for v in variants if v not in out]
        if rest:
            out.update(self._compiled_rows(state, k, exclude, rest))
        if not _SESSION_VARIANTS.isdisjoint(rest):
            lists = self._session_lists(state, k, now_ms, exclude, rest)
            out.update((v, self._result_rows(ranked[0], k)) for v, ranked in lists.items())
        return [out[v] if v in out else self._variant_rows(state, k, now_ms, exclude, v)
                for v in variants]

    def _shared_rows(
        self, state: UserState, k: int, now_ms: int, exclude: Collection[str],
        variants: Sequence[str],
    ) -> dict[str, list[int]]:
        """:meth:`component_rows` of the learned blend and, from its collection's compiled
        call (:func:`_bk.blend_collect_variants`: each query once, the blend's bans), of
        ``sknn``, ``stan``, ``sr``, the single components and ``fixed`` (those that
        :meth:`_session_lists` and :meth:`_compiled_rows` rank), by variant. Empty (the
        separate calls rank them) where the learned blend does not collect through it:
        ``blend`` not asked for or fixed, a cold start, a popularity penalty -- or where
        it would share nothing (``blend`` alone: :func:`_bk.blend_collect` costs less)."""
        if ("blend" not in variants or self.blend != "learned" or not state.recent
                or self.cooccurrence.pop_penalty > 0 or self.rules.pop_penalty > 0):
            return {}
        want, fixed = self._component_variants(variants)
        if not want and not fixed and _SESSION_VARIANTS.isdisjoint(variants):
            return {}  # nothing to share: the blend's own call costs less (its returns)
        size = len(self.vocabulary)
        flags, user = self._component_args(state, k, want, fixed)
        members, pop_w, pop_total = self.popularity.ranking_inputs(size)
        share = _VariantShare((
            "stan" in variants, "sknn" in variants, "sr" in variants, 3 * k,
            pop_total or 1.0, *self._knn_pair_scratch(size), *flags, pop_total,
            self.mf.factors(), _NO_FACTORS if user is None else user, user is not None))
        ranked = self._learned_order(state, now_ms, exclude, share)
        if ranked is None:  # (not with plays)
            return {}
        out = {"blend": self._result_rows(ranked[0], k)}
        if share.out is None:  # (an empty catalogue)
            return out
        outcomes, lists = share.unpacked()
        out.update(self._component_rows(lists, want, fixed, k))
        # numpy's choice where a cut had ties (its fill: the bans again, only then)
        need_fill = any(o[0] & _sk.NEED_FILL for o in outcomes)
        fill_args = (self._ban_buffer(size),
                     self._banned_rows(state, exclude, share.recent) if need_fill else _NO_ROWS,
                     3 * k, members, pop_w, pop_total or 1.0, size)
        for v, outcome in zip(("stan", "sknn", "sr"), outcomes, strict=True):
            if v in variants:
                out[v] = self._result_rows(self._finish_session(outcome, fill_args)[0], k)
        return out

    def _variant_rows(
        self, state: UserState, k: int, now_ms: int, exclude: Collection[str], variant: str
    ) -> list[int]:
        """One variant's rows for :meth:`component_rows` (``k`` > 0)."""
        if variant == "blend" and self.blend == "learned":
            ranked = self._learned_order(state, now_ms, exclude)
            if ranked is not None:
                return self._result_rows(ranked[0], k)
            variant = "fixed"  # a cold start: the fixed blend's list
            fixed = self._compiled_rows(state, k, exclude, (variant,))
            if variant in fixed:
                return fixed[variant]
        index = self.vocabulary.index  # (a recommended track is in the catalogue)
        return [index[r.track_id] for r in self.recommend(state, k, now_ms, exclude=exclude,
                                                          variant=variant)]

    def _compiled_rows(
        self, state: UserState, k: int, exclude: Collection[str], variants: Sequence[str]
    ) -> dict[str, list[int]]:
        """The rows of those of ``variants`` that :meth:`_rank_compiled` ranks (the single
        components; ``fixed``, and ``blend`` with ``blend="fixed"``, unless the skip
        penalty takes them to the reference path), in one compiled call
        (:func:`_k.rank_components`), by variant."""
        want, fixed = self._component_variants(variants)
        if not want and not fixed:
            return {}
        size = len(self.vocabulary)
        if size == 0:
            as_fixed = {"fixed", "blend"} if self.blend == "fixed" else {"fixed"}
            return {v: [] for v in variants if v in want or (fixed and v in as_fixed)}
        ban_other = self._exclude_rows(exclude)
        size, hist_rows, ban_recent, (members, pop_weights, pop_total), arena, factors = (
            self._compiled_query(state, size))
        start, csize, cap, total, nbr, val = arena
        flags, user = self._component_args(state, k, want, fixed)
        with self._query_buffers(size) as (ban, sc):
            # each list as _rank_query(query, k, {v: 1.0}, {v: 1.0, "popularity": 1e-6},
            # user if v == "mf" else None, ...) ranks it, and the fixed blend's as
            # _rank_query(query, k, w, w, user if w["mf"] > 0 else None, ...)
            ranked = _k.rank_components(
                size, *flags, members, pop_weights, pop_total, start, csize, cap, total, nbr,
                val, hist_rows, float(self.cooccurrence.query_decay), sc.acc, sc.best, sc.anchor,
                sc.touched, factors, _NO_FACTORS if user is None else user,
                user is not None, ban, self._mark_buffer(size), ban_recent, ban_other,
            )
        return self._component_rows(ranked, want, fixed, k)

    def _component_variants(self, variants: Collection[str]) -> tuple[set[str], bool]:
        """Which of ``variants`` :func:`_k.component_lists` ranks: the single components,
        and whether the fixed blend (``fixed``, or ``blend`` with ``blend="fixed"``; not
        with the skip penalty, which takes the reference path)."""
        want = {v for v in variants if v in _SINGLE_COMPONENTS}
        as_fixed = {"fixed", "blend"} if self.blend == "fixed" else {"fixed"}
        fixed = self.blend_weights.get("skip", 0.0) <= 0 and not as_fixed.isdisjoint(variants)
        return want, fixed

    def _component_args(
        self, state: UserState, k: int, want: set[str], fixed: bool
    ) -> tuple[tuple[Any, ...], Float32Array | None]:
        """:func:`_k.component_lists`' flags and weights (``k`` to ``bw_mf``) for the
        single components ``want`` and the fixed blend (if ``fixed``), and the listener's
        MF vector (None when no list reads it, or they have none)."""
        w = self.blend_weights
        fixed_mf = fixed and w.get("mf", 0.0) > 0
        user = self._user_vector(state) if "mf" in want or fixed_mf else None
        n = max(self.candidates_per_source, k)
        return (k, n, "popularity" in want, "mf" in want, "cooccurrence" in want,
                bool(self.mf_candidates), fixed, n if w.get("popularity", 0.0) > 0 else k,
                w.get("cooccurrence", 0.0) > 0, fixed_mf and user is not None,
                bool(self.mf_candidates or w.get("cooccurrence", 0.0) == 0),
                w.get("popularity", 0.0), w.get("cooccurrence", 0.0), w.get("mf", 0.0)), user

    def _component_rows(self, ranked: tuple[IntArray, ...], want: set[str], fixed: bool,
                        k: int) -> dict[str, list[int]]:
        """What :meth:`_result_rows` keeps of :func:`_k.component_lists`' ranked rows, by
        variant."""
        out: dict[str, list[int]] = {}
        for v, rows in zip(("popularity", "mf", "cooccurrence", "fixed"), ranked, strict=True):
            if v in want or (v == "fixed" and fixed):
                out[v] = self._result_rows(rows, k)
        if fixed and self.blend == "fixed":
            out["blend"] = list(out["fixed"])
        return out

    def _result_rows(self, rows: IntArray, k: int) -> list[int]:
        """The rows of the tracks :meth:`_results` keeps of ranked ``rows`` (the artist
        cap)."""
        artist_of = self.artist_of
        cap_n = self.max_per_artist if artist_of else None
        if cap_n is None:
            return cast(list[int], rows[:k].tolist())
        ids = self.vocabulary.ids
        out: list[int] = []
        per_artist: dict[str, int] = {}
        shards = artist_of.shards
        for r in rows.tolist():
            track = ids[r]
            artist = shards[hash(track) & SHARD_MASK].get(track)  # artist_of.get, inlined
            if artist is not None:
                if per_artist.get(artist, 0) >= cap_n:
                    continue
                per_artist[artist] = per_artist.get(artist, 0) + 1
            out.append(r)
            if len(out) >= k:
                break
        return out

    def _results(
        self, rows: IntArray, totals: FloatArray, reasons: IntArray, leads: IntArray, k: int
    ) -> list[Recommendation]:
        """The first ``k`` ranked candidates (after the artist cap) with their reasons."""
        cap_n = self.max_per_artist if self.artist_of else None
        # Materialise only the prefix that can be kept (rows are up to n_pop + 2n long, and
        # turning all of them into Python objects was most of this method's cost): the
        # first k without an artist cap, else 2k at first and the rest only if the cap
        # dropped enough of those.
        stop = min(len(rows), k if cap_n is None else 2 * k)
        return cast(list[Recommendation], self._results_from(
            (rows[None], totals[None], reasons[None], leads[None]), 0, len(rows), k, cap_n,
            stop, (rows[:stop].tolist(), _k.round6(totals[:stop]).tolist(),
                   totals[:stop].tolist(), reasons[:stop].tolist(), leads[:stop].tolist())))

    def _results_from(
        self,
        arrays: tuple[IntArray, FloatArray, IntArray, IntArray],
        q: int,
        count: int,
        k: int,
        cap_n: int | None,
        stop: int,
        prefix: tuple[list[int], list[float], list[float], list[int], list[int]],
        reasons: bool = True,
    ) -> list[RankedItem]:
        """:meth:`_results` of row ``q`` of the 2-D ``arrays`` (rows, totals, reasons,
        leads; ``count`` candidates), from its first ``stop`` candidates already as Python
        lists (``prefix``: rows, scores rounded to 6 places by :func:`_k.round6` -- NaN
        where it left them to ``round`` --, the raw scores, reason codes and leads; the
        batched path converts every listener's prefix at once); the rest of the row only if
        the artist cap dropped enough of them. Without ``reasons``: plain tuples, and no
        reason text where it names the lead track (:meth:`rank_items_many`)."""
        ids = self.vocabulary.ids
        artist_shards = self.artist_of.shards  # artist_of.get, inlined below
        per_artist: dict[str, int] = {}
        because: dict[tuple[int, int], str] = {}
        out: list[RankedItem] = []
        make = _make_recommendation  # tuple.__new__: skips the NamedTuple's Python __new__
        kind = Recommendation if reasons else tuple  # tuple.__new__(tuple, t) is t
        naming = _NAMING_REASONS
        unnamed = _UNNAMED_TEXTS
        while True:
            for row, score, raw, code, lead in zip(*prefix, strict=True):
                track = ids[row]
                if cap_n is not None:
                    artist = artist_shards[hash(track) & SHARD_MASK].get(track)
                    if artist is not None:
                        n_artist = per_artist.get(artist, 0)
                        if n_artist >= cap_n:
                            continue
                        per_artist[artist] = n_artist + 1
                if score != score:  # round6 left it to Python (or it is NaN)
                    score = round(raw, 6)
                if lead >= 0 and code in naming:
                    name = naming[code]
                    reason = because.get((code, lead)) if reasons else None
                    if reason is None and reasons:
                        reason = because[code, lead] = reason_text(name, ids[lead])
                    out.append(make(kind, (track, score, reason, name, ids[lead])))
                else:
                    plain = unnamed.get(code)
                    if plain is None:
                        plain = (_reason_code(code), reason_text(_reason_code(code)))
                    out.append(make(kind, (track, score, plain[1], plain[0], None)))
                if len(out) >= k:
                    return out
            if stop >= count:
                return out
            rows, totals, codes, leads = (a[q, stop:count] for a in arrays)
            prefix = (rows.tolist(), _k.round6(totals).tolist(), totals.tolist(),
                      codes.tolist(), leads.tolist())
            stop = count

    def _rank_reference(
        self,
        query: Interaction,
        k: int,
        banned: Iterable[str] | tuple[Iterable[str], SeenTracks],
        weights: Mapping[str, float],
        blend_weights: Mapping[str, float],
        anchors: list[tuple[int, float]],
    ) -> list[Recommendation]:
        """Candidates and component scores in numpy, ranked by :func:`rank_tracks` (any
        blend, the skip penalty included; the compiled path's reference)."""
        # Banned tracks never become candidates, so the ranker needs no exclusion set (and
        # the listener's seen set, up to hundreds of ids, is not copied into one).
        track_ids, components, leads = self._candidates(query, k, banned, weights, anchors)
        if not track_ids:
            return []
        return rank_tracks(
            track_ids,
            components,
            weights=blend_weights,
            k=k,
            artist_of=self.artist_of,
            max_per_artist=self.max_per_artist,
            anchors=leads,
        )

    def _candidates(
        self,
        query: Interaction,
        k: int,
        banned: Iterable[str] | tuple[Iterable[str], SeenTracks],
        weights: Mapping[str, float],
        anchors: list[tuple[int, float]],
    ) -> tuple[list[str], dict[str, FloatArray], Callable[[str], str | None]]:
        """The bounded candidate set (each component's best ``candidates_per_source``, never
        a banned track), every component's scores for it, and for the tracks co-occurrence
        reached, the recent track that led there most strongly."""
        size = len(self.vocabulary)
        if size == 0:
            return [], {}, _no_lead
        n = max(self.candidates_per_source, k)
        index = self.vocabulary.index
        ban = self._ban_buffer(size)
        ban_rows = np.asarray(_ban_rows(banned, index, self.vocabulary), dtype=np.int64)
        # a SeenTracks of another vocabulary may hold rows past the flags (as _banned_rows)
        ban_rows = ban_rows[(ban_rows >= 0) & (ban_rows < len(ban))]
        ban[ban_rows] = True
        use_cooc = weights.get("cooccurrence", 0.0) > 0
        try:
            with self.cooccurrence.accumulate(anchors if use_cooc else []) as touched:
                # Each source yields its own top rows without sorting the catalogue:
                # trending from its kept top set, co-occurrence from the rows its anchors
                # touch (compiled), MF from one partition of its scores.
                picks = [self.popularity.top_set(
                    n if weights.get("popularity", 0.0) > 0 else k, ban)]
                if use_cooc and touched.n:
                    picks.append(_k.top_allowed(touched.rows(), touched.scratch.acc, ban, n))
                mf: FloatArray | None = None
                if weights.get("mf", 0.0) > 0:
                    mf = self.mf.score_all(query)
                    if mf is not None and (self.mf_candidates or not use_cooc):
                        picks.append(_top_of(np.flatnonzero(~ban[:size]), mf, n))
                rows = _k.unique_rows(np.concatenate(picks), self._mark_buffer(size))
                components: dict[str, FloatArray] = {
                    "popularity": self.popularity.score_rows(rows)}
                ids = self.vocabulary.ids
                lead: IntArray | None = None
                if use_cooc:
                    components["cooccurrence"] = touched.scratch.acc[rows]
                    lead = touched.scratch.anchor[rows]
        finally:
            ban[ban_rows] = False
        if mf is not None:
            components["mf"] = mf[rows]
        if weights.get("skip", 0.0) > 0:
            feats: dict[str, FloatArray] = {
                name: components[name] for name in ("popularity", "mf") if name in components
            }
            components["skip"] = self.skip.predict_many(query, feats)
        track_ids = list(map(ids.__getitem__, rows.tolist()))
        return track_ids, components, _leads(track_ids, lead, ids)

    @contextlib.contextmanager
    def _query_buffers(self, size: int) -> Iterator[tuple[BoolArray, Any]]:
        """The ban flags and co-occurrence scratch for one compiled query call, which leaves
        them as it found them; if it raises, they are cleared here."""
        ban = self._ban_buffer(size)
        sc = self.cooccurrence.acquire_scratch(size)
        try:
            yield ban, sc
        except BaseException:
            ban[:] = False  # the kernel did not get to clear its bans
            sc.clear()  # nor its scratch
            raise
        finally:
            self.cooccurrence.release_scratch(sc)

    def _ban_buffer(self, size: int) -> BoolArray:
        """A reusable all-False flag per track (set and cleared by each query)."""
        return self._scratch_flags("_ban", size)

    def _mark_buffer(self, size: int) -> BoolArray:
        return self._scratch_flags("_mark", size)

    def _scratch_flags(self, name: str, size: int) -> BoolArray:
        buf = self.__dict__.get(name)
        if buf is None or len(buf) < size:
            buf = np.zeros(max(size, 2 * (0 if buf is None else len(buf)), 64), dtype=bool)
            self.__dict__[name] = buf
        out: BoolArray = buf
        return out

    def similar(self, track_id: str, k: int) -> list[Recommendation]:
        """"More like this": the tracks played alongside ``track_id`` (co-occurrence in
        both directions) blended with its nearest tracks in MF factor space."""
        if k <= 0:
            return []
        row = self.vocabulary.index.get(track_id)
        if row is None:
            return []
        n = max(self.candidates_per_source, k)
        # co-occurrence: only the rows the seed's neighbour list touches (no dense pass
        # over the catalogue; the worker refreshes many of these lists per second)
        cooc_model = self.cooccurrence
        with cooc_model.accumulate(cooc_model.anchors((track_id,))) as touched:
            t_rows = touched.rows().copy()
            t_vals = touched.scratch.acc[t_rows]
        keep = (t_vals > 0) & (t_rows != row)
        t_rows, t_vals = t_rows[keep], t_vals[keep]
        by_row = np.argsort(t_rows, kind="stable")
        t_rows, t_vals = t_rows[by_row], t_vals[by_row]
        picks = [t_rows[np.lexsort((t_rows, -t_vals))[:n]]]
        near = self.mf.similar_all(track_id, norms=self._item_norms())
        if near is not None:
            picks.append(top_rows(near, n))
        rows = np.unique(np.concatenate(picks))
        if not len(rows):
            return []
        at = np.minimum(np.searchsorted(t_rows, rows), max(len(t_rows) - 1, 0))
        cooc = (np.where(t_rows[at] == rows, t_vals[at], 0.0) if len(t_rows)
                else np.zeros(len(rows)))
        components = {"cooccurrence": cooc}
        if near is not None:
            components["mf"] = near[rows]
        ids = self.vocabulary.ids
        track_ids = [ids[r] for r in rows.tolist()]
        recs = rank_tracks(
            track_ids,
            components,
            weights={"cooccurrence": 1.0, "mf": 0.5},
            k=k,
            exclude={track_id},
            anchors=lambda _t: track_id,
        )
        out = []
        for r in recs:
            code = "played_with" if r.code == "played" else "liked_by_listeners_of"
            out.append(
                Recommendation(r.track_id, r.score, reason_text(code, track_id), code, track_id)
            )
        return out

    def _item_norms(self) -> Float32Array:
        """L2 norms of the MF item factors for "more like this", kept across calls: the
        worker refreshes many lists between two plays, and recomputing the norms of the
        whole catalogue (~50 ms at 500k tracks) was most of each list's cost. New tracks get
        theirs as they appear; learning moves the factors of the rows it touches, so each
        call also recomputes the next :data:`_NORM_SLICE` rows, round robin (at 500k
        tracks a norm is at most 16 calls old); an eviction moves them with their tracks.
        Computed by :meth:`_norms_into` into kept buffers: the same values as
        ``np.linalg.norm(rows, axis=1) + 1e-12``, without its two fresh temporaries of
        the rows' size per call (4 MiB per slice: their first-touch page faults held the
        loop 43-50 ms of CPU in the 1M junk-ids drill, session 15)."""
        factors = self.mf.factors()
        n = len(self.vocabulary)
        cached = self.__dict__.get("_norms")
        if cached is None or cached[0] != self.vocabulary.generation or len(cached[1]) > n:
            norms = self._norm_space(n, keep=0)
            self._norms_into(factors, 0, n, norms)
            self.__dict__["_norms"] = (self.vocabulary.generation, norms, 0)
            return norms
        _, norms, pos = cached
        if len(norms) < n:
            norms = self._grow_norms(factors, norms, n)
        end = min(pos + _NORM_SLICE, n)
        self._norms_into(factors, pos, end, norms[pos:end])
        self.__dict__["_norms"] = (self.vocabulary.generation, norms, 0 if end >= n else end)
        return norms

    def _grow_norms(self, factors: Float32Array, norms: Float32Array, n: int) -> Float32Array:
        """``norms`` with the rows up to ``n`` added (theirs computed), in the kept buffer."""
        have = len(norms)
        grown = self._norm_space(n, keep=have, old=norms)
        self._norms_into(factors, have, n, grown[have:n])
        return grown

    def _norm_space(self, n: int, keep: int, old: Float32Array | None = None) -> Float32Array:
        """The first ``n`` rows of the kept norms buffer (grown by :func:`grow_rows`, so
        once to the reserved rows; the first ``keep`` rows of ``old`` carried over)."""
        buf = self.__dict__.get("_norm_buf")
        if buf is None or len(buf) < n:
            base = buf if buf is not None else np.zeros(0, dtype=np.float32)
            buf = self.__dict__["_norm_buf"] = grow_rows(base, n)
        if keep and old is not None and not np.shares_memory(old[:1], buf[:1]):
            buf[:keep] = old[:keep]
        out: Float32Array = buf[:n]
        return out

    def _norms_into(self, factors: Float32Array, lo: int, hi: int, out: Float32Array) -> None:
        """``out[:] = np.linalg.norm(factors[lo:hi], axis=1) + 1e-12``, bit for bit, in
        pieces of :data:`_NORM_SLICE` rows through one kept product buffer."""
        k = factors.shape[1] if factors.ndim == 2 else 0
        tmp = self.__dict__.get("_norm_tmp")
        if tmp is None or tmp.shape != (_NORM_SLICE, k) or tmp.dtype != factors.dtype:
            tmp = self.__dict__["_norm_tmp"] = np.zeros((_NORM_SLICE, k), dtype=factors.dtype)
        for a in range(lo, hi, _NORM_SLICE):
            b = min(a + _NORM_SLICE, hi)
            part, rows, dst = tmp[: b - a], factors[a:b], out[a - lo : b - lo]
            np.multiply(rows, rows, out=part)  # linalg.norm's (x.conj() * x).real
            np.add.reduce(part, axis=1, out=dst)
            np.sqrt(dst, out=dst)
            dst += 1e-12

    def evict_tracks(
        self, keep: int, on_evicted: Callable[[list[str]], None] | None = None
    ) -> int:
        """Bound the catalogue: keep the ``keep`` tracks with the highest decayed popularity
        (ties at the cut: the lower row stays), drop the rest from every model, and give
        their rows to the survivors above ``keep`` (every other track keeps its row).
        Returns how many were evicted; ``on_evicted`` gets their ids. Listeners' histories
        may still name evicted tracks: they are unknown ids to the models from then on
        (like tracks never seen).

        Cost: O(catalogue) numpy work (a partition of the weights), one compiled pass over
        the co-occurrence lists and O(evicted) dictionary work -- ~0.2-0.9 s at the default
        500k-track cap, against ~4 s for the renumber-everything loop it replaced
        (docs/benchmarks.md, "Eviction at the track cap"). :meth:`eviction_steps` does the
        same in steps of about a millisecond (the worker's way)."""
        return drain(self.eviction_steps(keep, on_evicted))

    def eviction_steps(
        self, keep: int, on_evicted: Callable[[list[str]], None] | None = None
    ) -> EvictionSteps[int]:
        """:meth:`evict_tracks` in steps (:data:`~stream.core.models._vocab.EvictionSteps`):
        slices of about a millisecond or less of GIL-holding work, and the compiled arena
        passes (GIL released) as callables, so that an event loop can run the slices
        between its other work and the compiled passes in a thread. Nothing may use the
        models until the last step has run."""
        n = len(self.vocabulary)
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep!r}")
        if n <= keep:
            return 0
        weights = np.zeros(n)
        w = self.popularity.weights()
        weights[: len(w)] = w[:n]
        plan = EvictionPlan.lightest(weights, keep)
        yield None
        cached = self.__dict__.pop("_norms", None)
        if cached is not None and cached[0] == self.vocabulary.generation:
            norms = cached[1][:n]
            if len(norms) < n:  # rows added since the last call: theirs first
                norms = self._grow_norms(self.mf.factors(), norms, n)
            norms[plan.holes] = norms[plan.movers]
            # (the generation the vocabulary takes below)
            self.__dict__["_norms"] = (self.vocabulary.generation + 1, norms[:keep], 0)
        self.__dict__.pop("_blend_cache", None)  # candidate rows of the old numbering
        yield None
        self.popularity.evict_rows(plan)
        yield None
        yield from self.cooccurrence.evict_steps(plan)
        yield from self.mf.evict_steps(plan)
        yield from self.session_knn.evict_steps(plan)
        yield from self.rules.evict_steps(plan)
        first_seen = grow_rows(self.first_seen, n)
        first_seen[plan.holes] = first_seen[plan.movers]
        first_seen[keep:n] = 0
        self.first_seen = first_seen
        yield None
        evicted = yield from self.vocabulary.fill_holes_steps(plan)
        yield from self._forget_artists_steps(evicted)
        if on_evicted is not None:
            on_evicted(evicted)
        return len(evicted)

    def _forget_artists_steps(self, evicted: list[str]) -> EvictionSteps[None]:
        """Forget the artists of ``evicted`` tracks, in slices of 1,024 tracks."""
        for lo in range(0, len(evicted), 1024):
            part = evicted[lo : lo + 1024]
            if self.tracks_of:
                self._drop_artist_tracks(part)
            if self.artist_of:
                deque(map(self.artist_of.pop, part, repeat(None)), maxlen=0)
            yield None

    def _drop_artist_tracks(self, evicted: list[str]) -> None:
        """Take evicted tracks out of their artists' latest-tracks lists (before
        ``artist_of`` forgets whose they were)."""
        artist_of, tracks_of = self.artist_of, self.tracks_of
        for track in evicted:
            artist = artist_of.get(track)
            latest = tracks_of.get(artist) if artist is not None else None
            if latest is not None and track in latest:
                latest.remove(track)
                if not latest:
                    del tracks_of[artist]  # type: ignore[arg-type]

    def trending(self, n: int) -> list[str]:
        """The ``n`` most popular tracks now (decayed plays), most popular first."""
        weights = self.popularity.weights()
        if n <= 0 or not len(weights):
            return []
        rows = top_rows(weights, n)  # best first
        ids = self.vocabulary.ids
        return [ids[r] for r in rows.tolist() if weights[r] > 0]

    def catalogue_size(self) -> int:
        """Distinct tracks the models know."""
        return len(self.vocabulary)

    def use_ranker(self, ranker: str) -> None:
        """Rank the ``variant="blend"`` lists with ``ranker`` (a :data:`BLEND_MODES` name;
        the worker's ``ranker`` setting, applied to a restored recommender too):
        ``"learned"`` also turns the session models on, ``"fixed"`` turns them off (they
        keep what they learned, and learn again if the learned ranker comes back)."""
        if ranker not in BLEND_MODES:
            raise ValueError(f"ranker must be one of {BLEND_MODES}, got {ranker!r}")
        self.session_models = ranker == "learned"
        self.blend = ranker
        self.__dict__.pop("_blend_cache", None)

    def user_ids(self) -> list[str]:
        """The listeners the models hold state about (their MF factors, their own recent
        tracks for ``repeats``; session-kNN links open sessions by an opaque token, see
        :func:`session_token`, and older checkpoints by listener id)."""
        return list(dict.fromkeys(chain(
            self.mf.user_factors, self.own_history,
            (u for u in self.session_knn.open_users() if not u.startswith("s:")))))

    def _artist_tracks(self) -> list[str]:
        """The tracks with a known artist in a deterministic order (the map's own follows
        ``hash``): the catalogue's rows, then any others by id."""
        artist_of = self.artist_of
        shards = artist_of.shards  # `t in artist_of`, inlined: 550k tracks at the cap
        tracks = [t for t in self.vocabulary.ids if t in shards[hash(t) & SHARD_MASK]]
        if len(tracks) != len(artist_of):
            tracks += sorted(set(artist_of).difference(tracks))
        return tracks

    @staticmethod
    def reserve_tracks(max_tracks: int) -> None:
        """Size every per-track array for ``max_tracks`` (plus the 10 % an eviction round
        overshoots) when it first grows: no growth copy on the event loop up to the cap
        (:func:`stream.core.models._vocab.reserve_rows`; process-wide)."""
        reserve_rows(int(max_tracks * 1.1) if max_tracks else 0)

    def limit_users(self, max_users: int | None) -> int:
        """Bound the per-listener model state (MF factors) to ``max_users`` listeners, the
        most recently played ones; returns how many were dropped now. The worker applies
        its ``max_users`` setting this way (also to a recommender restored from a
        checkpoint)."""
        self.max_users = max_users
        dropped = self.mf.limit_users(max_users)
        if max_users is not None:
            own = self.own_history
            while len(own) > max_users:  # least recently played first (insertion order)
                del own[next(iter(own))]
        return dropped

    def forget_user(self, user_id: str, state: UserState | None = None) -> bool:
        """Drop everything kept about one listener (their MF factors, own recent tracks and
        session-kNN's link to their open session: by its token when their session
        ``state`` is given). Shared statistics (co-occurrence, SR, popularity, session-kNN's
        sessions) hold no user ids. Their record in the session state
        (:attr:`UserState.model`) goes with the session. Returns whether anything was
        held."""
        held = self.own_history.pop(user_id, None) is not None
        held = self.mf.forget_user(user_id) or held
        if state is not None and state.session_key:
            held = self.session_knn.forget_user(session_token(state)) or held
        return self.session_knn.forget_user(user_id) or held

    # -- checkpoints ----------------------------------------------------------------------

    def export_state(
        self, users: bool = True
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """All learned state: a JSON-able manifest (parameters, counters, the component
        models' manifests) and numeric arrays (the shared vocabulary once, then each
        component's arrays under its name). :meth:`import_state` rebuilds an equal
        recommender; :mod:`stream.core.checkpoint` frames and signs the pair.

        ``users=False`` leaves out the partition-local listener state (MF user factors,
        own histories): the worker's checkpoint is item-side only, each listener's state
        travels in their session (:meth:`export_user`)."""
        vocab_manifest, vocab_arrays = self.vocabulary.export_state()
        tracks = self._artist_tracks()
        t_blob, t_ends = encode_strings(tracks)
        a_blob, a_ends = encode_strings([self.artist_of[t] for t in tracks])
        manifest: dict[str, Any] = {
            "model_version": self.model_version,
            "params": {name: getattr(self, name) for name in _PARAMS},
            "blend_weights": dict(self.blend_weights),
            "n_learned": self.n_learned,
            "vocabulary": vocab_manifest,
            "models": {},
        }
        arrays: dict[str, np.ndarray] = {
            **prefixed("vocabulary", vocab_arrays),
            "artist_of.tracks.bytes": t_blob, "artist_of.tracks.ends": t_ends,
            "artist_of.artists.bytes": a_blob, "artist_of.artists.ends": a_ends,
            "first_seen": self.first_seen[: len(self.vocabulary)].astype(np.int64),
        }
        # artist -> latest tracks and listener -> own recent tracks: keys, then the
        # concatenated lists with one end offset per key
        own_history = self.own_history if users else {}
        for name, table in (("tracks_of", self.tracks_of), ("own_history", own_history)):
            keys = list(table)
            k_blob, k_ends = encode_strings(keys)
            values = [t for key in keys for t in table[key]]
            v_blob, v_ends = encode_strings(values)
            arrays.update({
                f"{name}.keys.bytes": k_blob, f"{name}.keys.ends": k_ends,
                f"{name}.values.bytes": v_blob, f"{name}.values.ends": v_ends,
                f"{name}.counts": np.array([len(table[key]) for key in keys], dtype=np.int64),
            })
        for name in _COMPONENTS:
            model = getattr(self, name)
            model_manifest, model_arrays = (model.export_state(users=False)
                                            if name == "mf" and not users
                                            else model.export_state())
            manifest["models"][name] = model_manifest
            arrays.update(prefixed(name, model_arrays))
        return manifest, arrays

    @classmethod
    def import_state(
        cls, manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
    ) -> Recommender:
        """The recommender :meth:`export_state` described. Every field is checked (type,
        dtype, shape, range, id lengths) and a bad one raises ValueError naming it."""
        version = get_field(manifest, "model_version", str)
        if version != MODEL_VERSION:
            raise ValueError(f"model_version: {version!r}, expected {MODEL_VERSION!r}")
        params = get_params(manifest, "recommender", _PARAMS)
        weights = params["weights"]
        if weights is not None and not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in weights.items()
        ):
            raise ValueError("recommender.params.weights: expected names and numbers")
        rec: Recommender = build("recommender", cls, params)
        blend = get_field(manifest, "blend_weights", dict)
        if set(blend) != set(rec.blend_weights):
            raise ValueError(f"blend_weights: names {sorted(blend)}, expected "
                             f"{sorted(rec.blend_weights)}")
        rec.blend_weights = {name: get_field(blend, name, float, where="blend_weights")
                             for name in rec.blend_weights}
        rec.n_learned = get_field(manifest, "n_learned", int, lo=0)
        vocab = Vocabulary.import_state(
            get_field(manifest, "vocabulary", dict), under("vocabulary", arrays),
            where="vocabulary")
        rec.vocabulary = vocab
        models = get_field(manifest, "models", dict)
        unknown = set(models) - set(_COMPONENTS)
        if unknown:
            raise ValueError(f"models: unknown component(s) {sorted(unknown)}")
        for name, model_cls in _COMPONENTS.items():
            sub = get_field(models, name, dict, where="models")
            kwargs: dict[str, Any] = {"where": name}
            if name in _SHARED_VOCABULARY:
                kwargs["vocabulary"] = vocab
            setattr(rec, name, model_cls.import_state(sub, under(name, arrays), **kwargs))
        tracks = _strings(arrays, "artist_of.tracks")
        artists = _strings(arrays, "artist_of.artists")
        if len(tracks) != len(artists):
            raise ValueError(f"artist_of: {len(tracks)} tracks for {len(artists)} artists")
        rec.artist_of = ShardedDict(zip(unique_ids("artist_of.tracks", tracks), artists,
                                        strict=True))
        n = len(vocab)
        first_seen = get_array(arrays, "first_seen", np.int64, ndim=1, lo=0)
        if len(first_seen) > n:
            raise ValueError(f"first_seen: {len(first_seen)} rows, the vocabulary has {n}")
        rec.first_seen = first_seen.copy()
        rec.tracks_of = {k: list(v) for k, v in _table(arrays, "tracks_of",
                                                       rec.artist_tracks).items()}
        rec.own_history = {k: dict.fromkeys(v) for k, v in _table(arrays, "own_history",
                                                                  rec.repeats).items()}
        if rec.max_users is not None and len(rec.own_history) > rec.max_users:
            raise ValueError(f"own_history: {len(rec.own_history)} listeners, max_users is "
                             f"{rec.max_users}")
        return rec

    def snapshot(self) -> bytes:
        """All learned state as bytes (:meth:`export_state` in the unsigned container of
        :func:`stream.core.checkpoint.pack_state`). Restore with :meth:`restore`."""
        from stream.core.checkpoint import pack_state

        return pack_state(*self.export_state())

    @classmethod
    def restore(cls, blob: bytes) -> Recommender:
        """A recommender with exactly the state captured by :meth:`snapshot`; a blob that
        is not one raises :class:`SnapshotError`."""
        from stream.core.checkpoint import CheckpointError, unpack_state

        try:
            return cls.import_state(*unpack_state(blob))
        except (CheckpointError, ValueError) as exc:
            raise SnapshotError(f"not a restorable recommender state: {exc}") from exc



@dataclass(slots=True)
class _VariantShare:
    """The all-variant ranking's request to the learned blend's collection
    (:meth:`Recommender._shared_rows`): ``args``, what :func:`_bk.blend_collect_variants`
    takes after :func:`_bk.blend_collect`'s arguments; after the collection, ``out`` (its
    returns after the blend's: the packed lists and trending's fill, :meth:`unpacked`)
    and ``recent`` (the rows it banned from)."""

    args: tuple[Any, ...]
    recent: IntArray = field(default_factory=lambda: _NO_ROWS)
    out: tuple[Any, ...] | None = None

    def collect(self, *blend_args: Any) -> tuple[Any, ...]:
        """:func:`_bk.blend_collect` of ``blend_args`` (its returns), the others kept."""
        try:
            result = _bk.blend_collect_variants(*blend_args, *self.args)
        except BaseException:
            self.args[5][:] = 0.0  # the SKNN scratch (the caller clears the others)
            raise
        if result[4]:
            self.recent, self.out = blend_args[0], result[5:]
        return cast(tuple[Any, ...], result[:5])

    def unpacked(self) -> tuple[list[_Outcome], tuple[IntArray, ...]]:
        """``out`` (:func:`_bk._pack`'s arrays and the fill) as STAN's, SKNN's and SR's
        outcomes (without model flags: the ids need none) and the four component lists."""
        assert self.out is not None
        meta, rows, vals, fill = self.out
        offs = meta.tolist()
        n = _bk.N_PACKED
        outcomes: list[_Outcome] = [
            (offs[n + 1 + i], rows[offs[i]:offs[i + 1]], vals[offs[i]:offs[i + 1]],
             _NO_FLAGS, fill) for i in range(3)]
        return outcomes, tuple(rows[offs[j]:offs[j + 1]] for j in range(3, n))


class SeenTracks(Collection[str]):
    """A listener's tracks to exclude (e.g. everything they played), kept both as ids and
    as this recommender's vocabulary rows, so ``recommend(..., exclude=seen)`` bans them
    with one array operation instead of hundreds of id lookups per query. Ids not in the
    catalogue yet are resolved when they appear; rows are rebuilt from the ids if the
    catalogue was renumbered (eviction) since."""

    __slots__ = ("_vocabulary", "_ids", "_rows", "_n", "_unresolved", "_generation")

    def __init__(self, vocabulary: Vocabulary) -> None:
        self._vocabulary = vocabulary
        self._ids: set[str] = set()
        self._rows: IntArray = np.zeros(16, dtype=np.int64)
        self._n = 0
        self._unresolved: set[str] = set()
        self._generation = vocabulary.generation

    def add(self, track_id: str) -> None:
        if track_id in self._ids:
            return
        self._ids.add(track_id)
        row = self._vocabulary.index.get(track_id)
        if row is None:
            self._unresolved.add(track_id)
        else:
            self._append(row)

    def _append(self, row: int) -> None:
        if self._n == len(self._rows):
            self._rows = np.concatenate((self._rows, np.zeros(self._n, dtype=np.int64)))
        self._rows[self._n] = row
        self._n += 1

    def rows(self) -> IntArray:
        """Vocabulary rows of the ids the catalogue knows (a view; read it, don't keep it)."""
        vocab = self._vocabulary
        if self._generation != vocab.generation:  # renumbered: map every id again
            self._n = 0
            self._unresolved = set(self._ids)
            self._generation = vocab.generation
        if self._unresolved:
            index = vocab.index
            found = [t for t in self._unresolved if t in index]
            for t in found:
                self._unresolved.discard(t)
                self._append(index[t])
        return self._rows[: self._n]

    def __contains__(self, item: object) -> bool:
        return item in self._ids

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


def _ban_rows(
    banned: Iterable[str] | tuple[Iterable[str], SeenTracks],
    index: Mapping[str, int],
    vocabulary: Vocabulary,
) -> IntArray | list[int]:
    if isinstance(banned, tuple) and len(banned) == 2 and isinstance(banned[1], SeenTracks):
        recent, seen = banned
        rows = [r for r in map(index.get, recent) if r is not None]
        return np.concatenate((np.fromiter(rows, np.int64, len(rows)), seen.rows()))
    return [r for r in map(index.get, banned) if r is not None]


#: the constructor arguments, as stored in a checkpoint (with their types)
_PARAMS: Final[dict[str, Any]] = {
    "weights": (dict, type(None)), "history_window": int, "history_decay": float,
    "cooc_window": int, "cooc_decay": float, "recent_filter": int,
    "max_per_artist": (int, type(None)), "candidates_per_source": int, "cross_session": bool,
    "n_factors": int, "popularity_half_life_ms": float, "seed": int, "mf_candidates": bool,
    "max_users": (int, type(None)), "blend": str, "stan_params": (dict, type(None)),
    "rules_params": (dict, type(None)), "blend_params": (dict, type(None)),
    "blend_candidates": int, "session_scope": str, "artist_tracks": int, "repeats": int,
    "session_models": bool, "blend_cooc_window": (int, type(None)),
    "blend_cooc_decay": (float, type(None)),
}
#: the component models, by attribute name, each with export_state / import_state
_COMPONENTS: Final[dict[str, Any]] = {
    "popularity": DecayedPopularity,
    "cooccurrence": SessionCooccurrence,
    "mf": ImplicitMF,
    "skip": SkipClassifier,
    "drift": SkipRateDrift,
    "session_knn": SessionKNN,
    "rules": SequentialRules,
    "ranker": LearnedBlend,
}
#: the components that index tracks through the recommender's vocabulary
_SHARED_VOCABULARY: Final = frozenset({"popularity", "cooccurrence", "mf", "session_knn",
                                       "rules"})


def _float_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    """``DEFAULT_WEIGHTS`` updated by ``weights``, as floats: an int weight (the API accepts
    1) would compile second signatures of the ranking kernels at the first ranking, after
    warm_up (review18b: ~11 s for ``blend_collect_variants``)."""
    return {name: float(w) for name, w in {**DEFAULT_WEIGHTS, **(weights or {})}.items()}


def _strings(arrays: Mapping[str, np.ndarray], name: str) -> list[str]:
    for part in ("bytes", "ends"):
        if f"{name}.{part}" not in arrays:
            raise ValueError(f"{name}.{part}: missing array")
    return decode_strings(name, arrays[f"{name}.bytes"], arrays[f"{name}.ends"])


def _table(arrays: Mapping[str, np.ndarray], name: str, limit: int) -> dict[str, list[str]]:
    """A str -> list of distinct str table exported as keys, values and per-key counts
    (each list non-empty and at most ``limit`` long)."""
    keys = unique_ids(f"{name}.keys", _strings(arrays, f"{name}.keys"))
    values = _strings(arrays, f"{name}.values")
    counts = get_array(arrays, f"{name}.counts", np.int64, shape=(len(keys),), lo=1,
                       hi=max(limit, 1))
    if int(counts.sum()) != len(values):
        raise ValueError(f"{name}.counts: sum to {int(counts.sum())}, there are "
                         f"{len(values)} values")
    if keys and limit < 1:
        raise ValueError(f"{name}: holds entries but its setting is 0")
    out: dict[str, list[str]] = {}
    pos = 0
    for key, count in zip(keys, counts.tolist(), strict=True):
        out[key] = unique_ids(f"{name}.values", values[pos : pos + count])
        pos += count
    return out


#: per-process buffers, not model state
_SCRATCH: Final = frozenset({"_ban", "_mark", "_norms", "_norm_buf", "_norm_tmp", "_dense",
                             "_pos", "_blend_cache"})
#: item-factor norms recomputed per "more like this" call (see Recommender._item_norms)
_NORM_SLICE: Final = 32_768
_NO_SCORES: Final[FloatArray] = np.zeros(0)
_NO_ROWS: Final[IntArray] = np.zeros(0, dtype=np.int64)
_NO_FACTORS: Final[Float32Array] = np.zeros(0, dtype=np.float32)
_NO_FLAGS: Final[BoolArray] = np.zeros(0, dtype=np.bool_)
#: a compiled session ranking's outcome (:func:`_sk.rank_stan`, :func:`_sk.rank_sr`):
#: status, rows, scores, model flags, trending's fill
_Outcome = tuple[int, IntArray, FloatArray, BoolArray, IntArray]


#: ``Recommendation`` from a (track_id, score, reason) tuple without the NamedTuple's
#: Python-level ``__new__`` (a third of the per-item cost of ``_results``)
_make_recommendation: Final[
    Callable[[type[tuple[Any, ...]], RankedItem], RankedItem]
] = tuple.__new__


#: reason codes of the learned blend's own sources (after the kernels' codes)
REASON_ARTIST: Final = 4
REASON_OWN: Final = 5
#: the :data:`stream.core.ranking.REASON_TEXTS` key of each reason code; the codes whose key
#: names a track (their lead row) are in :data:`_NAMING_REASONS`, with the key they take
#: when there is no lead
_REASON_KEYS: Final[Mapping[int, str]] = {
    _k.REASON_MF: "similar_taste",
    _k.REASON_COOCCURRENCE: "played_recently",
    _k.REASON_POPULARITY: "trending",
    REASON_ARTIST: "same_artist",
    REASON_OWN: "played_before",
}
#: reason code -> the REASON_TEXTS key naming its lead track ({anchor})
_NAMING_REASONS: Final[Mapping[int, str]] = {
    _k.REASON_COOCCURRENCE: "played",
    REASON_ARTIST: "same_artist",
}
#: the key of a naming code without a lead
_UNNAMED: Final[Mapping[int, str]] = {REASON_ARTIST: "trending"}


def _reason_code(code: int) -> str:
    """The :data:`stream.core.ranking.REASON_TEXTS` key of a reason code without a lead track
    (a code with a lead names its track: see :data:`_NAMING_REASONS`)."""
    key = _UNNAMED.get(code) or _REASON_KEYS.get(code)
    return key if key is not None else "trending"


#: reason code -> (its key without a lead track, that key's English text): the texts of
#: the kernels' and the learned blend's codes, made once (``reason_text`` per item was
#: ~0.25 us of every kept track); another code is looked up as it comes
_UNNAMED_TEXTS: Final[Mapping[int, tuple[str, str]]] = {
    code: (_reason_code(code), reason_text(_reason_code(code))) for code in range(8)
}


def _no_lead(_track: str) -> str | None:
    return None


def _leads(
    track_ids: list[str], lead: IntArray | None, ids: list[str]
) -> Callable[[str], str | None]:
    """The recent track that led co-occurrence to each candidate (looked up lazily: the
    ranker asks only for the K tracks it keeps)."""
    if lead is None:
        return _no_lead
    position = {t: i for i, t in enumerate(track_ids)}
    leads: list[int] = lead.tolist()

    def anchor_of(track: str) -> str | None:
        i = position.get(track)
        if i is None or leads[i] < 0:
            return None
        return ids[leads[i]]

    return anchor_of


def _top_of(rows: IntArray, scores: FloatArray, n: int) -> IntArray:
    """The (up to) ``n`` of ``rows`` with the highest ``scores``, in no particular order."""
    if len(rows) <= n:
        return rows
    out: IntArray = rows[np.argpartition(-scores[rows], n - 1)[:n]]
    return out


_DAY_MS: Final = 24 * 3600 * 1000
#: the listener's last plays whose artists the blend's ``recent_artist`` weighs (session
#: 17), each ``ARTIST_DECAY`` ** (plays since) -- 0.9, as the long co-occurrence's decay
ARTIST_WINDOW: Final = 30
ARTIST_DECAY: Final = 0.9


def _scale(values: FloatArray) -> FloatArray:
    """Non-negative scores divided by their maximum (all zero stays zero)."""
    hi = float(values.max()) if len(values) else 0.0
    if hi <= 0:
        return np.zeros(len(values))
    out: FloatArray = values / hi
    return out


def _recent_skip_rate(state: UserState, window: int = 10) -> float:
    flags = state.recent_skipped[-window:]
    return (sum(flags) + 0.25) / (len(flags) + 1.0)


def warm_up() -> float:
    """Compile (or load from numba's on-disk cache) every kernel the recommender uses, by
    running a tiny recommender through learning, every ranking path, "more like this" and
    eviction. Returns the seconds it took.

    The worker calls this before it joins its consumer group: compiling on the first play
    instead held the event loop for tens of seconds on a fresh install, and a worker
    killed mid-compile left the cache empty for the next one. ``scripts/setup.sh`` runs it
    once after installing, so processes start from the cache."""
    import time

    from stream.core.events import PlayEvent
    from stream.core.session import update_session

    started = time.perf_counter()
    # a small session table: the kernels' types do not depend on its size, and eviction
    # copies all of it (the default 50,000 x 50 table took ~2 s of every start-up)
    rec = Recommender(seed=0, max_per_artist=1, stan_params={"max_sessions": 64})
    rec.cooccurrence.max_neighbours = 2  # so rows fill up and get pruned
    states: dict[str, UserState] = {}
    steps: list[ItemStep] = []
    for i in range(400):
        user, track = f"u{i % 7}", f"t{(i * 7919) % 97}"
        event = PlayEvent(user, track, 1_700_000_000_000 + i * 1000, 200_000, f"e{i}",
                          artist_id=f"a{i % 5}", skipped=i % 4 == 0)
        update = update_session(states.get(user), event)
        step = rec.learn_one(update, event).step
        if step is not None:
            steps.append(step)
        states[user] = update.state
    # a peer's item steps (the signals' path: the blend rows' bounds and step are compiled)
    Recommender(seed=0, stan_params={"max_sessions": 64}).apply_item_steps(steps)
    seen = SeenTracks(rec.vocabulary)
    for state in states.values():
        for variant in VARIANTS:
            rec.recommend(state, 5, 1_700_000_500_000, variant=variant, exclude=seen)
        rec.component_ids(state, 5, 1_700_000_500_000, VARIANTS, exclude=seen)  # the replay's
        seen.add(state.recent[0])
    # a session model's list where numpy chooses among tracks tied at a cut (rare: a first
    # such play would compile it on the event loop)
    _, pop_w, _ = rec.popularity.ranking_inputs(len(rec.vocabulary))
    _sk.session_order(_NO_ROWS.copy(), _NO_SCORES.copy(), np.array([0]), pop_w, 1.0)
    rec.recommend_many(list(states.values()), 5, 1_700_000_500_000)
    rec.mf_candidates = True
    rec.recommend(next(iter(states.values())), 5, 1_700_000_500_000)
    rec.recommend_many(list(states.values()), 5, 1_700_000_500_000)
    # the worker's default ranker ("fixed") ranks a flush's listeners in one compiled
    # call (rank_many), a path the learned blend above never takes: without this its
    # first flush compiled it on the event loop (5-25 s on a fresh install)
    rec.use_ranker("fixed")
    rec.recommend_many(list(states.values()), 5, 1_700_000_500_000)
    rec.use_ranker("learned")
    # the live per-component quality's one compiled call (component_ids: rank_components),
    # for a listener with MF factors and one without: compiled on the first sampled play
    # otherwise, which froze a fresh install's loop for ~20 s and tripped the freeze fence
    for state in (next(iter(states.values())), UserState(user_id="warm-up")):
        for mf_candidates in (True, False):
            rec.mf_candidates = mf_candidates
            rec.component_ids(state, 5, 1_700_000_500_000, ("popularity", "mf", "cooccurrence"))
    rec.similar("t0", 5)
    rec.evict_tracks(50)
    rec.recommend(next(iter(states.values())), 5, 1_700_000_500_000)
    return time.perf_counter() - started
