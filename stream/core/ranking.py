"""Candidates -> blended score -> filtered, artist-diversified top-K, each with a reason.

Pure and model-agnostic: the caller (:class:`stream.core.recommender.Recommender`) gathers a
bounded candidate set and one score array per component; this module normalises and blends
them, drops tracks the listener must not get again, caps tracks per artist, and says why
each track is there.

>>> recs = rank_tracks(
...     ["a", "b", "c"],
...     {"cooccurrence": np.array([0.0, 2.0, 1.0]), "popularity": np.array([0.9, 0.1, 0.0])},
...     weights={"cooccurrence": 1.0, "popularity": 0.5},
...     k=2,
...     exclude={"c"},
...     anchors={"b": "x"},
... )
>>> [(r.track_id, r.reason) for r in recs]
[('b', 'because you played x'), ('a', 'popular right now')]
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Final, NamedTuple

import numpy as np

from stream.core.models.base import FloatArray

#: Blend weights chosen by measurement on the MovieLens-100K replay (docs/benchmarks.md).
DEFAULT_WEIGHTS: Final[Mapping[str, float]] = {
    "cooccurrence": 1.0,
    "mf": 0.1,
    "popularity": 0.1,
    "skip": 0.0,
}

#: Components whose scores are a penalty (subtracted, e.g. predicted skip probability).
PENALTIES: Final = frozenset({"skip"})

REASONS: Final[Mapping[str, str]] = {
    "cooccurrence": "because you played {anchor}",
    "mf": "listeners with similar taste play this",
    "popularity": "popular right now",
}
FALLBACK_REASON: Final = "popular right now"

#: Stable, machine-readable reason codes (documents carry them as ``reason_code``, with the
#: track a reason names as ``reason_track_id``), and the English text of each; ``{anchor}``
#: is the named track (its title and artist when known, else its id).
REASON_TEXTS: Final[Mapping[str, str]] = {
    "played": "because you played {anchor}",
    "played_recently": "often played together with your recent tracks",
    "similar_taste": "listeners with similar taste play this",
    "trending": "popular right now",
    "trending_topup": "popular right now (topping up your list)",
    "played_with": "often played with {anchor}",
    "liked_by_listeners_of": "liked by listeners of {anchor}",
    "same_artist": "more by the artist of {anchor}",
    "played_before": "you played this before",
}
_CODE_OF_COMPONENT: Final[Mapping[str, str]] = {
    "mf": "similar_taste",
    "popularity": "trending",
}


def reason_text(code: str, anchor: str | None = None) -> str:
    """The English reason for ``code``, naming ``anchor`` where the code names a track.

    >>> reason_text("played", "Karma Police by Radiohead")
    'because you played Karma Police by Radiohead'
    """
    text = REASON_TEXTS.get(code, FALLBACK_REASON)
    return text.format(anchor=anchor) if "{anchor}" in text else text


class Recommendation(NamedTuple):
    """One ranked track with a human-readable reason (a named tuple: built ten times per
    ranking, where a frozen dataclass's ``__init__`` was a measurable cost). ``code`` is
    the reason's key in :data:`REASON_TEXTS`, ``anchor`` the track it names (if any)."""

    track_id: str
    score: float
    reason: str
    code: str = "trending"
    anchor: str | None = None


#: A ranked track as the documents read it: ``(track_id, score, reason, code, anchor)``, a
#: :class:`Recommendation` or a plain tuple whose ``reason`` is None where it names
#: ``anchor`` (the documents name the anchor by its title, so the batched path leaves that
#: text to :meth:`stream.core.catalog.TrackCatalog.items`: Recommender.rank_items_many).
RankedItem = tuple[str, float, str | None, str, str | None]


def normalise(scores: FloatArray) -> FloatArray:
    """Scale to [0, 1] within the candidate set: non-negative scores by their maximum,
    signed ones (factor dot products) min-max. All-equal scores carry no signal -> zeros."""
    if scores.size == 0:
        return scores
    hi = float(scores.max())
    lo = float(scores.min())
    if lo >= 0:
        return scores / hi if hi > 0 else np.zeros_like(scores)
    if hi <= lo:
        return np.zeros_like(scores)
    out: FloatArray = (scores - lo) / (hi - lo)
    return out


def blend(
    components: Mapping[str, FloatArray], weights: Mapping[str, float], size: int
) -> tuple[FloatArray, dict[str, FloatArray]]:
    """Weighted sum of normalised component scores; also each component's contribution."""
    total = np.zeros(size)
    parts: dict[str, FloatArray] = {}
    for name, scores in components.items():
        w = weights.get(name, 0.0)
        if w == 0.0 or len(scores) != size:
            continue
        if name in PENALTIES:
            total -= w * scores
            continue
        part = w * normalise(scores)
        parts[name] = part
        total += part
    return total, parts


def rank_tracks(
    track_ids: Sequence[str],
    components: Mapping[str, FloatArray],
    *,
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
    k: int = 10,
    exclude: Collection[str] = frozenset(),
    artist_of: Mapping[str, str] | Callable[[str], str | None] | None = None,
    max_per_artist: int | None = None,
    anchors: Mapping[str, str] | Callable[[str], str | None] | None = None,
) -> list[Recommendation]:
    """Blend, filter, diversify and explain: the top ``k`` of ``track_ids``.

    ``components`` maps a component name to scores aligned with ``track_ids``. Tracks in
    ``exclude`` never appear; at most ``max_per_artist`` tracks per artist when ``artist_of``
    knows the artist. ``anchors`` names, for a track, the played track that led to it (used
    for the "because you played X" reason). Ties break on candidate order (deterministic).
    """
    if k <= 0 or not track_ids:
        return []
    if max_per_artist is not None and max_per_artist < 1:
        raise ValueError(f"max_per_artist must be >= 1, got {max_per_artist!r}")
    size = len(track_ids)
    total, parts = blend(components, weights, size)
    # Stable sort on -total: ties keep candidate order, as lexsort((arange, -total)) did.
    order = np.argsort(-total, kind="stable")
    artist_lookup = _lookup(artist_of)
    anchor_lookup = _lookup(anchors)
    per_artist: dict[str, int] = {}
    out: list[Recommendation] = []
    # Python lists: reading a few entries from them is far cheaper than numpy scalar reads.
    totals = total.tolist()
    part_lists = {name: part.tolist() for name, part in parts.items()}
    for i in order.tolist():
        track = track_ids[i]
        if track in exclude:
            continue
        if max_per_artist is not None and artist_lookup is not None:
            artist = artist_lookup(track)
            if artist is not None:
                if per_artist.get(artist, 0) >= max_per_artist:
                    continue
                per_artist[artist] = per_artist.get(artist, 0) + 1
        code, anchor = explain_code(i, part_lists, track, anchor_lookup)
        out.append(
            Recommendation(track, round(totals[i], 6), reason_text(code, anchor), code, anchor)
        )
        if len(out) >= k:
            break
    return out


def explain(
    i: int,
    parts: Mapping[str, FloatArray] | Mapping[str, list[float]],
    track: str,
    anchor_of: Callable[[str], str | None] | None,
) -> str:
    """The reason of the component that contributed most to candidate ``i``'s score."""
    return reason_text(*explain_code(i, parts, track, anchor_of))


def explain_code(
    i: int,
    parts: Mapping[str, FloatArray] | Mapping[str, list[float]],
    track: str,
    anchor_of: Callable[[str], str | None] | None,
) -> tuple[str, str | None]:
    """(reason code, named track or None) of the component that contributed most."""
    best, best_value = None, 0.0
    for name, part in parts.items():
        value = float(part[i])
        if value > best_value:
            best, best_value = name, value
    if best is None:
        return "trending", None
    if best == "cooccurrence":
        anchor = anchor_of(track) if anchor_of is not None else None
        if anchor is None:
            return "played_recently", None
        return "played", anchor
    return _CODE_OF_COMPONENT.get(best, "trending"), None


def top_up(
    recs: Sequence[RankedItem], trending: Sequence[str], k: int, avoid: Collection[str] = ()
) -> list[RankedItem]:
    """``recs`` filled up to ``k`` from ``trending`` (most popular first) with the reason
    ``trending_topup``: tracks not listed yet and not in ``avoid`` (the listener's recent
    tracks) first; only an otherwise empty list takes ``avoid``'s tracks too, so a known
    listener never gets an empty list once anything has been played.

    >>> [r.track_id for r in top_up([], ["a", "b"], 3, avoid={"a"})]
    ['b']
    >>> [r.track_id for r in top_up([], ["a"], 3, avoid={"a"})]
    ['a']
    """
    if len(recs) >= k:
        return list(recs)
    out = list(recs)
    listed = {r[0] for r in recs}  # r[0]: the track id (a Recommendation or a RankedItem)
    for allow_avoided in (False, True):
        if allow_avoided and out:
            break
        for track in trending:
            if len(out) >= k:
                break
            if track in listed or (not allow_avoided and track in avoid):
                continue
            listed.add(track)
            out.append(
                Recommendation(track, 0.0, reason_text("trending_topup"), "trending_topup")
            )
    return out


def _lookup(
    source: Mapping[str, str] | Callable[[str], str | None] | None,
) -> Callable[[str], str | None] | None:
    if source is None:
        return None
    if isinstance(source, Mapping):
        return source.get
    return source
