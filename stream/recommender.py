"""The recommendation core: learns from one play at a time and ranks tracks for a listener.

Pure: no Kafka, Redis or Prometheus. The worker, the offline replay and the benchmarks all
drive this same class. Time is always the event's time, passed in.

>>> from stream.events import PlayEvent
>>> from stream.session import update_session
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
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any, Final

import numpy as np

from stream.events import PlayEvent
from stream.models import _kernels as _k
from stream.models._state import (
    build,
    decode_strings,
    encode_strings,
    get_field,
    get_params,
    prefixed,
    under,
    unique_ids,
)
from stream.models._vocab import BoolArray, EvictionPlan, IntArray, Vocabulary, top_rows
from stream.models.base import FloatArray, Interaction
from stream.models.cooccurrence import SessionCooccurrence
from stream.models.drift import SkipRateDrift
from stream.models.factorization import Float32Array, ImplicitMF
from stream.models.popularity import DecayedPopularity
from stream.models.skip import SkipClassifier
from stream.ranking import (
    DEFAULT_WEIGHTS,
    REASONS,
    Recommendation,
    rank_tracks,
    reason_text,
)
from stream.session import SessionUpdate, UserState

__all__ = [
    "VARIANTS",
    "LearnResult",
    "Recommendation",
    "Recommender",
    "SeenTracks",
    "SnapshotError",
]

MODEL_VERSION: Final = "blend-2"  # 2: compiled core, MF retrieval off by default

#: Ways to rank, for side-by-side evaluation: each single component alone, and the blend.
VARIANTS: Final = ("popularity", "mf", "cooccurrence", "blend")


class SnapshotError(ValueError):
    """A snapshot blob is not one this version of the recommender can restore."""


@dataclass(frozen=True, slots=True)
class LearnResult:
    """What learning one event revealed: the skip model's prediction for it (made before
    learning, for prequential accuracy) and whether the skip-rate drift detector fired."""

    skip_probability: float
    skipped: bool
    drift: bool


class Recommender:
    """Blend of session co-occurrence, online MF and trending, with a skip-model penalty.

    Parameters are plain values so the worker can build it from configuration:

    - ``weights``: blend weight per component (``cooccurrence``, ``mf``, ``popularity``,
      ``skip``); missing names take :data:`stream.ranking.DEFAULT_WEIGHTS`.
    - ``history_window`` / ``history_decay``: how many recent tracks seed co-occurrence
      candidates, and their geometric weight by distance.
    - ``recent_filter``: never recommend the listener's last N tracks.
    - ``max_per_artist``: at most this many tracks of one artist per list (when artist ids
      are known); ``None`` disables the cap.
    - ``candidates_per_source``: candidate-set size drawn from each component.
    - ``cross_session``: learn co-occurrence across a listener's session boundary too.
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
    ) -> None:
        if recent_filter < 0:
            raise ValueError(f"recent_filter must be >= 0, got {recent_filter!r}")
        if candidates_per_source < 1:
            raise ValueError(f"candidates_per_source must be >= 1, got {candidates_per_source!r}")
        if max_per_artist is not None and max_per_artist < 1:
            raise ValueError(f"max_per_artist must be >= 1 or None, got {max_per_artist!r}")
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
        self.blend_weights: dict[str, float] = {**DEFAULT_WEIGHTS, **(weights or {})}
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
        self.artist_of: dict[str, str] = {}
        self.n_learned = 0
        self.model_version = MODEL_VERSION

    # -- learning -------------------------------------------------------------------------

    def learn_one(self, update: SessionUpdate, event: PlayEvent | None = None) -> LearnResult:
        """Learn from one applied event. Pass the ``event`` too when you have it: its
        artist id and context feed the diversity cap and the skip model."""
        if update.duplicate:
            return LearnResult(0.0, False, False)
        state, before = update.state, update.before
        track = state.recent[-1]
        keep_history = self.cross_session or not update.new_session
        history = tuple(before.recent) if keep_history else ()
        context = event.context if event is not None else None
        if event is not None and event.artist_id:
            self.artist_of[track] = event.artist_id
        features: dict[str, float] = {}
        x = Interaction(
            user_id=state.user_id,
            track_id=track,
            ts_ms=state.last_event_ts_ms,
            skipped=update.is_skip,
            history=history,
            session_position=0 if update.new_session else before.session_plays,
            recent_skip_rate=_recent_skip_rate(before),
            context=context,
            artist_id=event.artist_id if event is not None else None,
            features=features,
        )
        # the other models' scores of this play *before* learning it, for the skip model
        # (their predict_one reads the listener, track and history, never the features)
        features["popularity"] = self.popularity.predict_one(x)
        features["mf"] = self.mf.predict_one(x)
        skip_probability = self.skip.predict_learn_one(x)
        self.drift.learn_one(x)
        self.popularity.learn_one(x)
        self.cooccurrence.learn_one(x)
        self.mf.learn_one(x)
        self.n_learned += 1
        return LearnResult(skip_probability, update.is_skip, self.drift.drift_detected)

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
        component alone (``popularity``, ``mf``, ``cooccurrence``) for evaluation."""
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        if k <= 0:
            return []
        weights = self.blend_weights if variant == "blend" else {variant: 1.0}
        # Single-component variants are filled with trending when they run short.
        blend_weights = weights if variant == "blend" else {variant: 1.0, "popularity": 1e-6}
        if blend_weights.get("skip", 0.0) > 0:  # the skip penalty: the general path
            recent = state.recent[-self.recent_filter :] if self.recent_filter else []
            query = Interaction(
                user_id=state.user_id,
                ts_ms=now_ms,
                history=tuple(state.recent),
                session_position=state.session_plays,
                recent_skip_rate=_recent_skip_rate(state),
                context=context,
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
        (:func:`stream.models._kernels.rank_many`). The worker ranks each flush's
        listeners this way."""
        if k <= 0 or not states:
            return [[] for _ in states]
        weights = self.blend_weights
        if weights.get("skip", 0.0) > 0 or len(states) == 1:
            return [self.recommend(state, k, now_ms) for state in states]
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
        return [
            self._results(out_rows[q, :c], out_totals[q, :c], out_reasons[q, :c],
                          out_leads[q, :c], k)
            for q, c in enumerate(out_count.tolist())
        ]

    def _query_rows(self, state: UserState) -> tuple[list[int], list[int]]:
        """A listener's recent tracks as vocabulary rows (-1 = unknown): the history that
        seeds co-occurrence, and the ones banned from their list."""
        cooc = self.cooccurrence
        get = self.vocabulary.index.get
        span = max(self.recent_filter, cooc.query_window)
        recent = [get(t, -1) for t in state.recent[-span:]] if span else []
        hist = recent[len(recent) - min(cooc.query_window, len(recent)) :]
        banned = (recent[len(recent) - min(self.recent_filter, len(recent)) :]
                  if self.recent_filter else [])
        return hist, banned

    def _user_vector(self, state: UserState) -> Float32Array | None:
        user = self.mf.user_factors.get(state.user_id)
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
        (:func:`stream.models._kernels.rank_query`): bans, co-occurrence from the recent
        tracks, candidates, normalised blend, order and reasons. Python looks up the recent
        tracks' rows, applies the artist cap to the first tracks and builds the K results."""
        size = len(self.vocabulary)
        if size == 0:
            return []
        n = max(self.candidates_per_source, k)
        cooc = self.cooccurrence
        get = self.vocabulary.index.get
        hist_list, ban_list = self._query_rows(state)
        hist_rows = np.array(hist_list, dtype=np.int64)
        ban_recent = np.array(ban_list, dtype=np.int64) if ban_list else _NO_ROWS
        if isinstance(exclude, SeenTracks):
            ban_other = exclude.rows()
        elif exclude:
            ban_other = np.fromiter(
                (r for r in map(get, exclude) if r is not None), dtype=np.int64
            )
        else:
            ban_other = _NO_ROWS
        use_cooc = weights.get("cooccurrence", 0.0) > 0
        user = self._user_vector(state) if weights.get("mf", 0.0) > 0 else None
        members, pop_weights, pop_total = self.popularity.ranking_inputs(size)
        start, csize, cap, total, nbr, val = cooc.arena()
        with self._query_buffers(size) as (ban, sc):
            ranked = _k.rank_query(
                size,
                n if weights.get("popularity", 0.0) > 0 else k,
                n,
                use_cooc,
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
                cooc.query_decay,
                sc.acc, sc.best, sc.anchor, sc.touched,
                self.mf.factors(),
                user if user is not None else _NO_SCORES,
                ban,
                self._mark_buffer(size),
                ban_recent,
                ban_other,
            )
        rows, totals, reasons, leads = ranked
        return self._results(rows, totals, reasons, leads, k)

    def _results(
        self, rows: IntArray, totals: FloatArray, reasons: IntArray, leads: IntArray, k: int
    ) -> list[Recommendation]:
        """The first ``k`` ranked candidates (after the artist cap) with their reasons."""
        ids = self.vocabulary.ids
        artist_of = self.artist_of
        cap_n = self.max_per_artist if artist_of else None
        count = len(rows)
        # Materialise only the prefix that can be kept (rows are up to n_pop + 2n long, and
        # turning all of them into Python objects was most of this method's cost): the
        # first k without an artist cap, else 2k at first and the rest only if the cap
        # dropped enough of those.
        stop = min(count, k if cap_n is None else 2 * k)
        start = 0
        per_artist: dict[str, int] = {}
        because: dict[int, str] = {}
        out: list[Recommendation] = []
        make = _make_recommendation  # tuple.__new__: skips the NamedTuple's Python __new__
        cooc = _k.REASON_COOCCURRENCE
        while start < stop:
            for row, score, code, lead in zip(
                rows[start:stop].tolist(),
                totals[start:stop].tolist(),
                reasons[start:stop].tolist(),
                leads[start:stop].tolist(),
                strict=True,
            ):
                track = ids[row]
                if cap_n is not None:
                    artist = artist_of.get(track)
                    if artist is not None:
                        n_artist = per_artist.get(artist, 0)
                        if n_artist >= cap_n:
                            continue
                        per_artist[artist] = n_artist + 1
                if code == cooc and lead >= 0:
                    reason = because.get(lead)
                    if reason is None:
                        reason = because[lead] = _BECAUSE.format(anchor=ids[lead])
                    out.append(make(Recommendation,
                                    (track, round(score, 6), reason, "played", ids[lead])))
                else:
                    name = _reason_code(code)
                    out.append(make(Recommendation,
                                    (track, round(score, 6), reason_text(name), name, None)))
                if len(out) >= k:
                    return out
            start, stop = stop, count
        return out

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
        ban_rows = _ban_rows(banned, index, self.vocabulary)
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

    def _item_norms(self) -> FloatArray:
        """L2 norms of the MF item factors for "more like this", kept across calls: the
        worker refreshes many lists between two plays, and recomputing the norms of the
        whole catalogue (~50 ms at 500k tracks) was most of each list's cost. New tracks get
        theirs as they appear; learning moves the factors of the rows it touches, so each
        call also recomputes the next :data:`_NORM_SLICE` rows, round robin (at 500k
        tracks a norm is at most 16 calls old); an eviction moves them with their tracks."""
        factors = self.mf.factors()
        n = len(self.vocabulary)
        cached = self.__dict__.get("_norms")
        if cached is None or cached[0] != self.vocabulary.generation or len(cached[1]) > n:
            norms: FloatArray = np.linalg.norm(factors[:n], axis=1) + 1e-12
            self.__dict__["_norms"] = (self.vocabulary.generation, norms, 0)
            return norms
        _, norms, pos = cached
        if len(norms) < n:
            norms = np.concatenate((norms, np.linalg.norm(factors[len(norms) : n], axis=1)
                                    + 1e-12))
        end = min(pos + _NORM_SLICE, n)
        norms[pos:end] = np.linalg.norm(factors[pos:end], axis=1) + 1e-12
        self.__dict__["_norms"] = (self.vocabulary.generation, norms, 0 if end >= n else end)
        return norms

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
        the co-occurrence lists and O(evicted) dictionary work -- ~15 ms at the default
        500k-track cap, against ~4 s for the renumber-everything loop it replaced
        (docs/benchmarks.md, "Eviction at the track cap")."""
        n = len(self.vocabulary)
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep!r}")
        if n <= keep:
            return 0
        weights = np.zeros(n)
        w = self.popularity.weights()
        weights[: len(w)] = w[:n]
        plan = EvictionPlan.lightest(weights, keep)
        cached = self.__dict__.pop("_norms", None)
        if cached is not None and cached[0] == self.vocabulary.generation:
            norms = cached[1][:n]
            if len(norms) < n:  # rows added since the last call: theirs first
                factors = self.mf.factors()
                norms = np.concatenate((norms, np.linalg.norm(factors[len(norms) : n], axis=1)
                                        + 1e-12))
            norms[plan.holes] = norms[plan.movers]
            # (the generation the vocabulary takes below)
            self.__dict__["_norms"] = (self.vocabulary.generation + 1, norms[:keep], 0)
        self.popularity.evict_rows(plan)
        self.cooccurrence.evict_rows(plan)
        self.mf.evict_rows(plan)
        evicted = self.vocabulary.fill_holes(plan)
        if self.artist_of:
            pop = self.artist_of.pop
            deque(map(pop, evicted, repeat(None)), maxlen=0)
        if on_evicted is not None:
            on_evicted(evicted)
        return len(evicted)

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

    def user_ids(self) -> list[str]:
        """The listeners the models hold state about (their MF factors)."""
        return list(self.mf.user_factors)

    def limit_users(self, max_users: int | None) -> int:
        """Bound the per-listener model state (MF factors) to ``max_users`` listeners, the
        most recently played ones; returns how many were dropped now. The worker applies
        its ``max_users`` setting this way (also to a recommender restored from a
        checkpoint)."""
        self.max_users = max_users
        return self.mf.limit_users(max_users)

    def forget_user(self, user_id: str) -> bool:
        """Drop everything kept about one listener (their MF factors). Shared statistics
        (co-occurrence, popularity) hold no user ids. Returns whether anything was held."""
        return self.mf.forget_user(user_id)

    # -- checkpoints ----------------------------------------------------------------------

    def export_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """All learned state: a JSON-able manifest (parameters, counters, the component
        models' manifests) and numeric arrays (the shared vocabulary once, then each
        component's arrays under its name). :meth:`import_state` rebuilds an equal
        recommender; :mod:`stream.checkpoint` frames and signs the pair."""
        vocab_manifest, vocab_arrays = self.vocabulary.export_state()
        tracks = list(self.artist_of)
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
        }
        for name in _COMPONENTS:
            model_manifest, model_arrays = getattr(self, name).export_state()
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
        rec.artist_of = dict(zip(unique_ids("artist_of.tracks", tracks), artists, strict=True))
        return rec

    def snapshot(self) -> bytes:
        """All learned state as bytes (:meth:`export_state` in the unsigned container of
        :func:`stream.checkpoint.pack_state`). Restore with :meth:`restore`."""
        from stream.checkpoint import pack_state

        return pack_state(*self.export_state())

    @classmethod
    def restore(cls, blob: bytes) -> Recommender:
        """A recommender with exactly the state captured by :meth:`snapshot`; a blob that
        is not one raises :class:`SnapshotError`."""
        from stream.checkpoint import CheckpointError, unpack_state

        try:
            return cls.import_state(*unpack_state(blob))
        except (CheckpointError, ValueError) as exc:
            raise SnapshotError(f"not a restorable recommender state: {exc}") from exc


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
    index: dict[str, int],
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
    "max_users": (int, type(None)),
}
#: the component models, by attribute name, each with export_state / import_state
_COMPONENTS: Final[dict[str, Any]] = {
    "popularity": DecayedPopularity,
    "cooccurrence": SessionCooccurrence,
    "mf": ImplicitMF,
    "skip": SkipClassifier,
    "drift": SkipRateDrift,
}
#: the components that index tracks through the recommender's vocabulary
_SHARED_VOCABULARY: Final = frozenset({"popularity", "cooccurrence", "mf"})


def _strings(arrays: Mapping[str, np.ndarray], name: str) -> list[str]:
    for part in ("bytes", "ends"):
        if f"{name}.{part}" not in arrays:
            raise ValueError(f"{name}.{part}: missing array")
    return decode_strings(name, arrays[f"{name}.bytes"], arrays[f"{name}.ends"])

_SCRATCH: Final = frozenset({"_ban", "_mark", "_norms"})  # per-process buffers, not model state
#: item-factor norms recomputed per "more like this" call (see Recommender._item_norms)
_NORM_SLICE: Final = 32_768
_NO_SCORES: Final[FloatArray] = np.zeros(0)
_NO_ROWS: Final[IntArray] = np.zeros(0, dtype=np.int64)
_BECAUSE: Final = REASONS["cooccurrence"]


#: ``Recommendation`` from a (track_id, score, reason) tuple without the NamedTuple's
#: Python-level ``__new__`` (a third of the per-item cost of ``_results``)
_make_recommendation: Final[
    Callable[[type[Recommendation], tuple[str, float, str, str, str | None]], Recommendation]
] = tuple.__new__


def _reason_code(code: int) -> str:
    """The :data:`stream.ranking.REASON_TEXTS` key of a kernel reason code (never the
    co-occurrence code with a lead: that one names its track)."""
    if code == _k.REASON_MF:
        return "similar_taste"
    if code == _k.REASON_COOCCURRENCE:
        return "played_recently"
    return "trending"


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

    from stream.events import PlayEvent
    from stream.session import update_session

    started = time.perf_counter()
    rec = Recommender(seed=0, max_per_artist=1)
    rec.cooccurrence.max_neighbours = 2  # so rows fill up and get pruned
    states: dict[str, UserState] = {}
    for i in range(400):
        user, track = f"u{i % 7}", f"t{(i * 7919) % 97}"
        event = PlayEvent(user, track, 1_700_000_000_000 + i * 1000, 200_000, f"e{i}",
                          artist_id=f"a{i % 5}", skipped=i % 4 == 0)
        update = update_session(states.get(user), event)
        rec.learn_one(update, event)
        states[user] = update.state
    seen = SeenTracks(rec.vocabulary)
    for state in states.values():
        for variant in VARIANTS:
            rec.recommend(state, 5, 1_700_000_500_000, variant=variant, exclude=seen)
        seen.add(state.recent[0])
    rec.recommend_many(list(states.values()), 5, 1_700_000_500_000)
    rec.mf_candidates = True
    rec.recommend(next(iter(states.values())), 5, 1_700_000_500_000)
    rec.recommend_many(list(states.values()), 5, 1_700_000_500_000)
    rec.similar("t0", 5)
    rec.evict_tracks(50)
    rec.recommend(next(iter(states.values())), 5, 1_700_000_500_000)
    return time.perf_counter() - started
