"""The closed set a play's free-text ``context`` is folded into, wherever it becomes a
feature or a label: the skip model keeps one weight per value and the listening metrics one
series per value, so neither grows with whatever producers write (pure: no I/O).

>>> [fold_context(c) for c in ("Album", "editorial_playlist", None, "my-own-thing")]
['album', 'playlist', 'none', 'other']
"""

from __future__ import annotations

from typing import Final

__all__ = ["CONTEXTS", "fold_context"]

#: Every value :func:`fold_context` returns.
CONTEXTS: Final = (
    "playlist",
    "album",
    "artist",
    "radio",
    "search",
    "collection",
    "catalog",
    "charts",
    "other",
    "none",
)
_ALIASES: Final = {
    "editorial_playlist": "playlist",
    "personalized_playlist": "playlist",
    "user_playlist": "playlist",
    "user_collection": "collection",
    "library": "collection",
    "liked_songs": "collection",
    "station": "radio",
    "chart": "charts",
}
_KNOWN: Final = frozenset(CONTEXTS)


def fold_context(context: str | None) -> str:
    """One of :data:`CONTEXTS` for a free-text play context (case and surrounding space
    ignored; known aliases such as Spotify's ``editorial_playlist`` mapped; anything else
    naming a playlist or a radio goes there; the rest is ``other``; none given: ``none``)."""
    if not context:
        return "none"
    c = context.strip().lower()
    if c in _KNOWN:
        return c
    alias = _ALIASES.get(c)
    if alias is not None:
        return alias
    if "playlist" in c:
        return "playlist"
    if "radio" in c:
        return "radio"
    return "other"
