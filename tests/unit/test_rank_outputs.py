"""The rank stage's faster paths give the same outputs as the code they replaced (session 14,
branch ``p1rank``): ``round(score, 6)`` decided in a compiled pass, the ranked results built
from lists converted once per batched call, the catalogue's items and the document bytes.
Each reference below is the previous implementation, kept here verbatim in substance."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
import pytest

from stream.core.catalog import TrackCatalog, TrackInfo
from stream.core.models import _kernels as _k
from stream.core.ranking import Recommendation, reason_text
from stream.core.recommender import (
    _NAMING_REASONS,
    REASON_ARTIST,
    REASON_OWN,
    Recommender,
    _reason_code,
)
from stream.processing.documents import encode_document


def _same_float(a: float, b: float) -> bool:
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def test_round6_is_pythons_round_wherever_it_decides() -> None:
    rng = np.random.default_rng(11)
    ties = (rng.integers(-10**7, 10**7, 50_000) + 0.5) / 1e6  # halves: left to Python
    values = np.concatenate([
        rng.random(100_000), rng.random(50_000) * 2 - 1, rng.random(50_000) * 3000 - 1500,
        ties, ties + rng.normal(0, 1e-12, len(ties)), rng.random(20_000) * 1e-6,
        -rng.random(20_000) * 1e-6,
        np.array([0.0, -0.0, 5e-7, -5e-7, 1.5e-6, 2.5e-6, 2147.483648, 2147.4836475,
                  5e-324, 1e300, -1e300, np.inf, -np.inf, np.nan]),
    ])
    got = _k.round6(values).tolist()
    decided = 0
    for v, r in zip(values.tolist(), got, strict=True):
        if r == r:
            decided += 1
            assert _same_float(r, round(v, 6)), v
        else:  # left to Python: not finite, too large, or within a hair of a half
            t = v * 1e6
            assert not math.isfinite(t) or abs(t) >= 2**31 or abs(t - round(t)) > 0.49, v
    assert decided > 0.7 * len(got)  # most values never reach Python's round
    # the sign of a zero, and values too large or not finite are left to Python
    assert math.copysign(1.0, _k.round6(np.array([-1e-9]))[0]) == -1.0
    assert np.isnan(_k.round6(np.array([1e300, np.inf, np.nan]))).all()


def _old_results(rec: Recommender, rows: Any, totals: Any, reasons: Any, leads: Any,
                 k: int) -> list[Recommendation]:
    """Recommender._results before session 14."""
    ids = rec.vocabulary.ids
    artist_of = rec.artist_of
    cap_n = rec.max_per_artist if artist_of else None
    count = len(rows)
    stop = min(count, k if cap_n is None else 2 * k)
    start = 0
    per_artist: dict[str, int] = {}
    out: list[Recommendation] = []
    while start < stop:
        for row, score, code, lead in zip(rows[start:stop].tolist(), totals[start:stop].tolist(),
                                          reasons[start:stop].tolist(),
                                          leads[start:stop].tolist(), strict=True):
            track = ids[row]
            if cap_n is not None:
                artist = artist_of.get(track)
                if artist is not None:
                    if per_artist.get(artist, 0) >= cap_n:
                        continue
                    per_artist[artist] = per_artist.get(artist, 0) + 1
            if lead >= 0 and code in _NAMING_REASONS:
                name = _NAMING_REASONS[code]
                out.append(Recommendation(track, round(score, 6), reason_text(name, ids[lead]),
                                          name, ids[lead]))
            else:
                name = _reason_code(code)
                out.append(Recommendation(track, round(score, 6), reason_text(name), name, None))
            if len(out) >= k:
                return out
        start, stop = stop, count
    return out


def _identical(a: list[Recommendation], b: list[Recommendation]) -> bool:
    """Equal to the bit that shows (the sign of a zero, NaN: repr tells them apart)."""
    return repr(a) == repr(b)


@pytest.mark.parametrize("artists", [0, 3, 40])
def test_results_match_the_previous_implementation(artists: int) -> None:
    """Random kernel outputs, the artist cap on (few artists: the rest of a row is read)
    and off, scores with halves at the sixth place, negative zeros and NaN."""
    rng = np.random.default_rng(artists)
    rec = Recommender(seed=0, max_per_artist=2)
    for i in range(300):
        rec.vocabulary.add(f"t{i}")
        if artists:
            rec.artist_of[f"t{i}"] = f"a{i % artists}"
    codes = np.array([0, 1, 2, 3, REASON_ARTIST, REASON_OWN, 9], dtype=np.int64)
    m, width = 6, 150
    for trial in range(60):
        counts = rng.integers(0, width + 1, m)
        out_rows = np.stack([rng.permutation(300)[:width] for _ in range(m)]).astype(np.int64)
        out_totals = rng.random((m, width)) * rng.choice([1.0, 1e-6, 3.0])
        if trial % 3 == 0:
            out_totals[:, ::4] = (rng.integers(0, 10**6, (m, (width + 3) // 4)) + 0.5) / 1e6
            out_totals[:, 1] = -0.0
            out_totals[0, 2] = np.nan
        out_reasons = rng.choice(codes, (m, width))
        out_leads = rng.integers(-1, 300, (m, width))
        for k in (1, 5, 10, 40):
            for q in range(m):
                c = int(counts[q])
                args = (out_rows[q, :c], out_totals[q, :c], out_reasons[q, :c], out_leads[q, :c])
                old = _old_results(rec, *args, k)
                assert _identical(rec._results(*args, k), old)


def _trained(seed: int, max_per_artist: int, users: int, tracks: int, artists: int,
             plays: int, catalog: TrackCatalog | None = None) -> tuple[Recommender, list[Any]]:
    """A fixed-blend recommender trained on a small synthetic stream, and its listeners
    (every other play names its track in ``catalog``)."""
    from stream.core.events import PlayEvent
    from stream.core.session import UserState, update_session

    rec = Recommender(seed=seed, blend="fixed", session_models=False,
                      max_per_artist=max_per_artist)
    states: dict[str, UserState] = {}
    for i in range(plays):
        n = (i * 7919 + i // 3) % tracks
        event = PlayEvent(f"u{i % users}", f"t{n}", 1_700_000_000_000 + i * 1000, 200_000,
                          f"e{i}", artist_id=f"a{n % artists}")
        update = update_session(states.get(event.user_id), event)
        rec.learn_one(update, event)
        states[event.user_id] = update.state
        if catalog is not None and i % 2:
            catalog.observe(event.track_id, f"Song {n}", None, None, ts_ms=event.ts_ms)
    return rec, list(states.values())


def test_batched_results_match_the_previous_implementation() -> None:
    """recommend_many's lists (one conversion of every listener's prefix) are the lists
    the previous _results built from the same kernel rows, through the artist cap."""
    rec, listeners = _trained(1, 1, 37, 211, 9, 3000)
    captured: list[tuple[Any, ...]] = []
    real = _k.rank_many

    def capture(*args: Any) -> None:
        real(*args)
        captured.append(tuple(np.array(a, copy=True) for a in args[-5:]))

    _k.rank_many = capture
    try:
        many = rec.recommend_many(listeners, 10, 1_700_010_000_000)
    finally:
        _k.rank_many = real
    (rows, totals, reasons, leads, count), = captured
    old = [_old_results(rec, rows[q, :c], totals[q, :c], reasons[q, :c], leads[q, :c], 10)
           for q, c in enumerate(count.tolist())]
    assert all(_identical(a, b) for a, b in zip(many, old, strict=True))
    assert sum(len(x) for x in many) > 100


def _old_items(cat: TrackCatalog, recs: list[Recommendation]) -> list[dict[str, Any]]:
    """TrackCatalog.items before session 14."""
    out: list[dict[str, Any]] = []
    reasons: dict[tuple[str, str], str] = {}
    for r in recs:
        anchor = r.anchor
        reason = r.reason
        if anchor is not None:
            key = (r.code, anchor)
            reason = reasons.get(key) or reasons.setdefault(
                key, reason_text(r.code, cat.label(anchor) or anchor))
        info = cat.get(r.track_id)
        names = {} if info is None else {
            field: getattr(info, field) for field in ("name", "artist", "album")
            if getattr(info, field) is not None}
        out.append({"track_id": r.track_id, "score": float(r.score), "reason": reason,
                    "reason_code": r.code, "reason_track_id": anchor, **names})
    return out


@pytest.mark.parametrize("max_wanted", [0, 3, 10_000])
def test_catalogue_items_and_documents_match_the_previous_implementation(
    max_wanted: int,
) -> None:
    def catalogue() -> TrackCatalog:
        cat = TrackCatalog(max_wanted=max_wanted)
        for i in range(12):
            cat.learn(f"t{i}", TrackInfo(f'Song "{i}" \u00e9' if i % 4 else None,
                                         f"Artist {i}" if i % 3 else None,
                                         "Alb\u00fcm" if i % 5 == 0 else None))
        return cat

    recs = [Recommendation(f"t{i}", round(0.1 * i, 6),
                           reason_text("played", f"t{i % 3 + 20}") if i % 2 else "x",
                           "played" if i % 2 else "trending", f"t{i % 3 + 20}" if i % 2 else None)
            for i in range(16)]
    recs.append(Recommendation("t5", 0, reason_text("played", "t7"), "played", "t7"))
    new_cat, old_cat = catalogue(), catalogue()
    new, old = new_cat.items(recs), _old_items(old_cat, recs)
    assert orjson.dumps(new) == orjson.dumps(old)
    assert list(new_cat._wanted) == list(old_cat._wanted)  # the same names asked for
    doc = dict(user_id="u\u00e9", seq=3, generated_at_ms=2, event_ts_ms=1, event_id="e",
               model_version="m", session={"session_id": "s"}, lineage="x")
    assert encode_document(items=new, **doc) == encode_document(items=old, **doc)  # type: ignore[arg-type]


def test_ranked_items_are_the_recommendations_without_the_id_named_reasons() -> None:
    """rank_items_many (what the processor ranks with) keeps recommend_many's tracks,
    scores, codes and anchors; the reason naming an anchor is left to the catalogue,
    whose items (and so the documents) come out the same from either."""
    cat = TrackCatalog()
    rec, listeners = _trained(2, 2, 29, 173, 11, 2000, cat)
    for group in (listeners, listeners[:1]):  # the batched call and the one-listener path
        recs = rec.recommend_many(group, 10, 1_700_010_000_000)
        items = rec.rank_items_many(group, 10, 1_700_010_000_000)
        assert [[(t, s, None if a is not None else r, c, a) for t, s, r, c, a in x]
                for x in recs] == [[tuple(i) for i in x] for x in items] or len(group) == 1
        assert [orjson.dumps(cat.items(x)) for x in recs] == \
            [orjson.dumps(cat.items(x)) for x in items]
    assert any(a is not None for x in rec.rank_items_many(listeners, 10, 1) for *_, a in x)
