"""Prequential (test-then-train) evaluation: score each event against the list recommended
*before* learning from it. The same code runs live in the worker (over a sliding window of
the last N events, exported as metrics) and offline in ``stream replay`` (whole stream).

>>> ev = Prequential(k=3)
>>> ev.observe("blend", ["a", "b", "c"], "b")
1
>>> ev.observe("blend", ["a", "b", "c"], "z") is None
True
>>> ev.summary()["blend"]["hr@3"], ev.summary()["blend"]["mrr@3"]
(0.5, 0.25)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Protocol

_EPS = 1e-15


def rank_of(recommended: Sequence[str], actual: str, k: int) -> int | None:
    """0-based position of ``actual`` in the first ``k`` recommendations, or None."""
    for i, track in enumerate(recommended[:k]):
        if track == actual:
            return i
    return None


def hit_at_k(recommended: Sequence[str], actual: str, k: int) -> float:
    """1.0 if ``actual`` is among the first ``k`` recommendations, else 0.0."""
    return 0.0 if rank_of(recommended, actual, k) is None else 1.0


def reciprocal_rank_at_k(recommended: Sequence[str], actual: str, k: int) -> float:
    """1 / (1-based rank) of ``actual`` within the top ``k``, 0.0 when absent."""
    rank = rank_of(recommended, actual, k)
    return 0.0 if rank is None else 1.0 / (rank + 1)


def ndcg_at_k(recommended: Sequence[str], actual: str, k: int) -> float:
    """NDCG@k with one relevant item: 1 / log2(rank + 1) (1-based rank); ideal DCG is 1."""
    rank = rank_of(recommended, actual, k)
    return 0.0 if rank is None else 1.0 / math.log2(rank + 2)


def log_loss(probability: float, label: bool) -> float:
    """Binary cross-entropy of one prediction (clipped so a sure miss is finite)."""
    p = min(max(probability, _EPS), 1 - _EPS)
    return -math.log(p if label else 1 - p)


@dataclass(slots=True)
class _Sums:
    n: int = 0
    hits: float = 0.0
    rr: float = 0.0
    ndcg: float = 0.0

    def add(self, hit: float, rr: float, ndcg: float, sign: int = 1) -> None:
        self.n += sign
        self.hits += sign * hit
        self.rr += sign * rr
        self.ndcg += sign * ndcg


@dataclass(slots=True)
class _Variant:
    total: _Sums = field(default_factory=_Sums)
    recent: _Sums = field(default_factory=_Sums)
    window: deque[tuple[float, float, float, tuple[str, ...]]] = field(default_factory=deque)
    shown_all: set[str] = field(default_factory=set)


class RowNames(Protocol):
    """Track ids by row (``stream.core.models._vocab.Vocabulary``): ``ids[row]``, and a
    ``generation`` that changes whenever rows are renumbered."""

    @property
    def ids(self) -> Sequence[str]: ...

    @property
    def generation(self) -> int: ...


@dataclass(slots=True)
class _Skip:
    n: int = 0
    correct: float = 0.0
    loss: float = 0.0


class Prequential:
    """Running HR@K, MRR@K, NDCG@K and catalogue coverage per variant, plus skip-model
    accuracy and log-loss.

    With ``window=None`` :meth:`summary` covers every observed event (offline replay); with
    ``window=N`` it covers the last N events per variant (live monitoring) -- pass
    ``cumulative=True`` to get the all-time numbers then. Catalogue coverage is the share of
    distinct tracks seen so far (as actual plays) that appeared in some recommended list.
    """

    def __init__(self, k: int = 10, window: int | None = None) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k!r}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window!r}")
        self.k = k
        self.window = window
        self._variants: dict[str, _Variant] = {}
        self._catalogue: set[str] = set()
        self._skip = _Skip()
        self._skip_window: deque[tuple[float, float]] = deque()
        self._skip_recent = _Skip()
        #: per row numbering (RowNames), its generation and, per variant, the rows whose
        #: ids ``shown_all`` holds (observe_rows adds only the ids of rows not among them)
        self._shown_rows: dict[int, tuple[RowNames, int, dict[str, set[int]]]] = {}
        #: (hit, rr, ndcg) of a hit at each rank (observe's arithmetic, the same floats)
        self._at_rank = [(1.0, 1.0 / (r + 1), 1.0 / math.log2(r + 2)) for r in range(k)]

    def observe(self, variant: str, recommended: Sequence[str], actual: str) -> int | None:
        """Record one test-then-train step; returns the 0-based rank of the hit, or None."""
        v = self._variants.get(variant)
        if v is None:
            v = self._variants[variant] = _Variant()
        self._catalogue.add(actual)
        top = tuple(recommended[: self.k])
        # rank_of(top, actual, k), on every play: the first position, found in C
        rank = top.index(actual) if actual in top else None
        hit = 0.0 if rank is None else 1.0
        rr = 0.0 if rank is None else 1.0 / (rank + 1)
        ndcg = 0.0 if rank is None else 1.0 / math.log2(rank + 2)
        total = v.total  # _Sums.add(hit, rr, ndcg), inlined (the same sums)
        total.n += 1
        total.hits += hit
        total.rr += rr
        total.ndcg += ndcg
        v.shown_all.update(top)
        if self.window is not None:
            recent = v.recent
            recent.n += 1
            recent.hits += hit
            recent.rr += rr
            recent.ndcg += ndcg
            window = v.window
            window.append((hit, rr, ndcg, top))
            if len(window) > self.window:
                old_hit, old_rr, old_ndcg, _ = window.popleft()
                # _Sums.add(..., sign=-1), inlined: x + (-1 * y) is exactly x - y
                recent.n -= 1
                recent.hits -= old_hit
                recent.rr -= old_rr
                recent.ndcg -= old_ndcg
        return rank

    def observe_rows(self, variants: Sequence[str], lists: Sequence[list[int]], played: int,
                     actual: str, names: RowNames) -> list[int | None]:
        """:meth:`observe` of each of ``variants`` with its list given as rows of
        ``names`` (``names.ids[row]`` is the track; ``played``: the row of ``actual``, -1
        if it has none), without a track id per list: the hit is the played row's rank,
        and only rows a variant never showed before are looked up, for its coverage (the
        same sums and sets as :meth:`observe`). Returns the ranks, in ``variants``' order.

        >>> class Names:
        ...     ids, generation = ["a", "b", "c"], 0
        >>> ev = Prequential(k=2)
        >>> ev.observe_rows(["x", "y"], [[0, 1], [2]], 1, "b", Names())
        [1, None]
        >>> ev.summary()["x"]["mrr@2"], ev.summary()["y"]["coverage"]
        (0.5, 1.0)
        """
        if self.window is not None:  # the window keeps each list's ids
            ids = names.ids
            return [self.observe(v, [ids[r] for r in rows], actual)
                    for v, rows in zip(variants, lists, strict=True)]
        self._catalogue.add(actual)
        shown_by = self._shown_by(names)
        k, at_rank, ids = self.k, self._at_rank, names.ids
        ranks: list[int | None] = []
        for variant, rows in zip(variants, lists, strict=True):
            v = self._variants.get(variant)
            if v is None:
                v = self._variants[variant] = _Variant()
            top = rows[:k] if len(rows) > k else rows
            total = v.total  # _Sums.add, inlined as in observe (the same sums)
            total.n += 1
            rank: int | None = None
            if played >= 0 and played in top:  # -1 (a new track) is never a hit
                found = top.index(played)
                hit, rr, ndcg = at_rank[found]
                total.hits += hit
                total.rr += rr
                total.ndcg += ndcg
                rank = found
            # (a miss adds 0.0 to each sum in observe: the same sums)
            shown = shown_by.get(variant)
            if shown is None:
                shown = shown_by[variant] = set()
            if not shown.issuperset(top):
                new = [r for r in top if r not in shown]
                shown.update(new)
                v.shown_all.update([ids[r] for r in new])
            ranks.append(rank)
        return ranks

    def _shown_by(self, names: RowNames) -> dict[str, set[int]]:
        """The shown rows by variant of ``names``' numbering (forgotten when it renumbers:
        a row may name another track then; the ids stay in ``shown_all``)."""
        kept = self._shown_rows.get(id(names))
        if kept is None or kept[1] != names.generation:
            # (names kept with them: its id stays its own)
            kept = self._shown_rows[id(names)] = (names, names.generation, {})
        return kept[2]

    def observe_skip(self, probability: float, skipped: bool) -> None:
        """Record the skip model's prediction for an event, made before learning from it."""
        correct = 1.0 if (probability >= 0.5) == skipped else 0.0
        p = min(max(probability, _EPS), 1 - _EPS)  # log_loss(probability, skipped), inlined
        loss = -math.log(p if skipped else 1 - p)
        whole, recent = self._skip, self._skip_recent
        whole.n += 1
        whole.correct += correct
        whole.loss += loss
        recent.n += 1
        recent.correct += correct
        recent.loss += loss
        if self.window is not None:
            self._skip_window.append((correct, loss))
            if len(self._skip_window) > self.window:
                old_correct, old_loss = self._skip_window.popleft()
                self._skip_recent.n -= 1
                self._skip_recent.correct -= old_correct
                self._skip_recent.loss -= old_loss

    def summary(self, cumulative: bool | None = None) -> dict[str, dict[str, float]]:
        """``{variant: {"hr@K", "mrr@K", "ndcg@K", "coverage", "events"}}`` and, once skip
        predictions were observed, ``{"skip": {"accuracy", "log_loss", "events"}}``."""
        whole = self.window is None if cumulative is None else cumulative
        k = self.k
        catalogue = len(self._catalogue) or 1
        out: dict[str, dict[str, float]] = {}
        for name, v in self._variants.items():
            sums = v.total if whole or self.window is None else v.recent
            n = sums.n or 1
            if whole or self.window is None:
                shown = len(v.shown_all)
            else:
                # the window's distinct shown tracks, counted here (the report timer asks
                # every 2 s) rather than kept up to date per play: ~1 ms for the worker's
                # 2,000-play window against ~10 us of Counter bookkeeping on every play
                shown = len(set(chain.from_iterable(entry[3] for entry in v.window)))
            out[name] = {
                f"hr@{k}": sums.hits / n,
                f"mrr@{k}": sums.rr / n,
                f"ndcg@{k}": sums.ndcg / n,
                "coverage": min(shown / catalogue, 1.0),
                "events": float(sums.n),
            }
        skip = self._skip if whole or self.window is None else self._skip_recent
        if skip.n:
            out["skip"] = {
                "accuracy": skip.correct / skip.n,
                "log_loss": skip.loss / skip.n,
                "events": float(skip.n),
            }
        return out


#: the single components the live worker scores next to its published blend (see
#: :class:`ComponentQuality`); the session models only when the recommender learns them
LIVE_COMPONENTS: tuple[str, ...] = ("popularity", "mf", "cooccurrence")
LIVE_SESSION_COMPONENTS: tuple[str, ...] = ("sknn", "stan", "sr")


class ComponentQuality:
    """Live prequential quality of each component next to the published ``blend``.

    The worker scores its published list (variant ``blend``) on every play; this ranks the
    other variants of ``stream replay`` -- ``popularity``, ``mf``, ``cooccurrence``, plus
    ``sknn``, ``stan``, ``sr`` and ``fixed`` when the recommender runs the learned blend
    (with the fixed ranker the session models do not learn, and ``fixed`` *is* the blend) --
    from the listener's state *before* a play (test-then-train: call it before the models
    learn the play) and records in the same :class:`Prequential` whether the play was in
    each list. Ranking every variant on every play would cost more than learning it, so
    only every ``every``-th call ranks (a deterministic 1-in-N sample of the blend's
    evaluated plays; each variant's window then spans ``every`` times as many plays).

    >>> class FakeRec:
    ...     session_models, blend = False, "fixed"
    ...     def recommend(self, state, k, now_ms, *, variant):
    ...         return [type("R", (), {"track_id": t})() for t in ("a", "b")]
    >>> ev = Prequential(k=10)
    >>> cq = ComponentQuality(every=2)
    >>> [cq.observe(ev, FakeRec(), None, "b", 0) for _ in range(4)]
    [False, True, False, True]
    >>> sorted(ev.summary()), ev.summary()["mf"]["events"], ev.summary()["mf"]["mrr@10"]
    (['cooccurrence', 'mf', 'popularity'], 2.0, 0.5)
    """

    def __init__(self, every: int = 10, k: int = 10) -> None:
        if every < 1 or k < 1:
            raise ValueError(f"every and k must be >= 1, got {every!r}, {k!r}")
        self.every = every
        self.k = k
        self.calls = 0

    @staticmethod
    def variants(recommender: object) -> tuple[str, ...]:
        """The variants scored live for this recommender's settings."""
        if getattr(recommender, "session_models", False) \
                and getattr(recommender, "blend", "fixed") == "learned":
            return (*LIVE_COMPONENTS, *LIVE_SESSION_COMPONENTS, "fixed")
        return LIVE_COMPONENTS

    def observe(self, evaluator: Prequential, recommender: object, before: object,
                track_id: str, now_ms: int) -> bool:
        """On every ``every``-th call, rank each live variant for ``before`` (the
        listener's state before the play of ``track_id``) and observe the play against it;
        returns whether this call ranked."""
        self.calls += 1
        if self.calls % self.every:
            return False
        variants = self.variants(recommender)
        many = getattr(recommender, "component_ids", None)
        if many is not None:  # the same lists, ranked together (Recommender.component_ids)
            lists = many(before, self.k, now_ms, variants)
        else:
            recommend = recommender.recommend  # type: ignore[attr-defined]
            lists = [[r.track_id for r in recommend(before, self.k, now_ms, variant=v)]
                     for v in variants]
        for variant, ids in zip(variants, lists, strict=True):
            evaluator.observe(variant, ids, track_id)
        return True
