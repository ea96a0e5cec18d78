"""The learned blend's compiled ranking kernels (``_blend_kernels``: ``blend_matrix``,
``blend_order``, ``blend_codes``, ``blend_scores``) against the Python / numpy references
they replaced, over randomised inputs. Review of issue #19: the suite passed with
``exp(-logit)`` flipped in ``blend_matrix`` and with ``blend_order`` emitting the codes
unpermuted; these tests fail on both."""

from __future__ import annotations

import numpy as np
import pytest

from stream.core.models import _blend_kernels as _bk
from stream.core.models import _kernels as _k
from stream.core.models._kernels import REASON_COOCCURRENCE, REASON_MF, REASON_POPULARITY
from stream.core.models._vocab import Vocabulary
from stream.core.models.base import Interaction
from stream.core.models.blend import N_FEATURES, PRIOR_EPS
from stream.core.models.popularity import DecayedPopularity
from stream.core.models.skip import SkipClassifier

_DAY_MS = 86_400_000
_SIZE = 300  # vocabulary rows of the random cases


def _trained_skip(rng: np.random.Generator) -> SkipClassifier:
    """A skip model with clearly non-zero weights on popularity and MF (an untrained one
    predicts 0.5, where ``p`` and ``1 - p`` are the same)."""
    skip = SkipClassifier(seed=0)
    for i in range(300):
        skip.learn_one(Interaction("u", "t", 1_700_000_000_000 + i * 977_000,
                                   session_position=i % 9, recent_skip_rate=(i % 5) / 5,
                                   skipped=i % 3 == 0,
                                   features={"popularity": rng.random() * 0.01,
                                             "mf": rng.normal()}))
    return skip


def _popularity(rng: np.random.Generator, plays: int) -> DecayedPopularity:
    """A trending model over ``_SIZE`` tracks after ``plays`` plays (0: total weight 0)."""
    vocab = Vocabulary()
    for r in range(_SIZE):
        vocab.add(f"t{r}")
    model = DecayedPopularity(vocabulary=vocab)
    for i in range(plays):
        track = f"t{min(int(rng.pareto(1.0)), _SIZE - 1)}"
        model.learn_one(Interaction("u", track, 1_700_000_000_000 + i * 60_000))
    return model


def test_blend_matrix_is_predict_many_then_blend_features() -> None:
    """``blend_matrix`` = popularity ``score_rows``, ``SkipClassifier.predict_many`` and
    ``blend_features``, to 1e-12, NaN where the reference has NaN (an MF score of NaN)."""
    rng = np.random.default_rng(5)
    skip = _trained_skip(rng)
    weights = skip.classifier.weights
    assert abs(weights["popularity"]) > 0.01 and abs(weights["mf"]) > 0.01
    pops = [_popularity(rng, 0), _popularity(rng, 50), _popularity(rng, 2000)]
    assert pops[0].score_inputs()[0].sum() == 0.0 and pops[2].score_inputs()[1] > 1.0
    worst, checked, with_nan = 0.0, 0, 0
    skip_range = [1.0, 0.0]
    for t in range(1500):
        m = int(rng.integers(0, 120)) if t % 50 else 0
        cands = np.sort(rng.permutation(_SIZE)[:m]).astype(np.int64)
        comp = np.abs(rng.normal(size=(m, 6))) * (rng.random((m, 6)) > 0.5)
        last = rng.random((m, 2)) * (rng.random((m, 2)) > 0.6)
        pop_model = pops[t % 3]
        pop_w, pop_total = pop_model.score_inputs()
        mf = rng.normal(size=m) * (3.0 if t % 2 else 0.01)
        if m > 3 and t % 13 == 0:
            mf[1] = np.nan
            with_nan += 1
        same = (rng.random(m) > 0.7).astype(np.float64)
        share = rng.random(m) * (rng.random(m) > 0.5)
        first = rng.integers(0, 10**12, _SIZE) * (rng.random(_SIZE) > 0.1)
        now = int(rng.integers(0, 2 * 10**12))
        hist = float(rng.random())
        blend_w = rng.random(3)
        query = Interaction("u", ts_ms=int(rng.integers(0, 10**12)),
                            session_position=int(rng.integers(0, 40)),
                            recent_skip_rate=float(rng.random()))
        X = np.full((m, N_FEATURES), -7.0)
        _bk.blend_matrix(cands, comp, pop_w, pop_total, mf, *skip.logit_terms(query), same,
                         share, first, now, hist, *blend_w, _DAY_MS, last, X)
        pop = pop_model.score_rows(cands)
        p_skip = skip.predict_many(query, {"popularity": pop, "mf": mf})
        want = np.full((m, N_FEATURES), -9.0)
        _k.blend_features(cands, comp, pop, mf, p_skip, same, share, first, now, hist, *blend_w,
                          _DAY_MS, last, want)
        np.testing.assert_array_equal(np.isnan(X), np.isnan(want), err_msg=f"case {t}")
        if m:
            diff = np.nan_to_num(np.abs(X - want), nan=0.0)
            worst = max(worst, float(diff.max()))
            assert diff.max() <= 1e-12, (t, np.argwhere(diff > 1e-12)[:5].tolist())
            finite = p_skip[np.isfinite(p_skip)]
            if len(finite):
                skip_range = [min(skip_range[0], finite.min()), max(skip_range[1], finite.max())]
            checked += 1
    assert checked > 1000 and with_nan > 50
    # the skip feature took values well away from 0.5 (where p and 1 - p agree)
    assert skip_range[0] < 0.3 or skip_range[1] > 0.7, skip_range


def _codes_reference(comp: np.ndarray, lead: np.ndarray, last: int) -> tuple[list[int], list[int]]:
    """The learned blend's reason per candidate, as documented in ``blend_codes``."""
    codes, leads = [], []
    for i in range(len(lead)):
        if comp[i, 0] > 0 and lead[i] >= 0:
            codes.append(REASON_COOCCURRENCE)
            leads.append(int(lead[i]))
        elif comp[i, 2] > 0:
            codes.append(REASON_COOCCURRENCE)
            leads.append(last)
        else:
            leads.append(-1)
            codes.append(REASON_MF if comp[i, 1] > 0 else _bk.REASON_ARTIST if comp[i, 3] > 0
                         else _bk.REASON_OWN if comp[i, 4] > 0 else REASON_POPULARITY)
    return codes, leads


def test_blend_order_is_the_stable_argsort_and_the_gathers() -> None:
    """``blend_order`` = ``np.argsort(-scores, kind="stable")`` and ``rows``, ``scores``,
    the reason codes and leads (``blend_codes``) gathered in that order; ties, -0.0 and
    every reason code."""
    rng = np.random.default_rng(8)
    seen_codes: set[int] = set()
    moved = 0
    for t in range(1500):
        m = int(rng.integers(0, 200)) if t % 40 else int(rng.integers(0, 3))
        kind = t % 3
        if kind == 0:
            scores = rng.normal(size=m)
        elif kind == 1:
            scores = rng.integers(-2, 3, m).astype(np.float64)  # many ties
        else:
            scores = np.round(rng.normal(size=m), 1)
        if m > 4 and t % 5 == 0:
            scores[rng.integers(0, m, 2)] = -0.0
        rows = rng.permutation(10 * max(m, 1))[:m].astype(np.int64)
        comp = np.abs(rng.normal(size=(m, 6))) * (rng.random((m, 6)) > 0.7)
        lead = rng.integers(-1, 50, m).astype(np.int64)
        last = int(rng.integers(-1, 50))
        codes, leads = _bk.blend_codes(comp, lead, last)
        want_codes, want_leads = _codes_reference(comp, lead, last)
        assert codes.tolist() == want_codes and leads.tolist() == want_leads, t
        order, o_rows, o_scores, o_codes, o_leads = _bk.blend_order(scores, rows, comp, lead,
                                                                    last)
        ref = np.argsort(-scores, kind="stable")
        np.testing.assert_array_equal(order, ref, err_msg=f"case {t}")
        np.testing.assert_array_equal(o_rows, rows[ref])
        np.testing.assert_array_equal(o_scores, scores[ref])
        np.testing.assert_array_equal(o_codes, codes[ref], err_msg=f"case {t}")
        np.testing.assert_array_equal(o_leads, leads[ref], err_msg=f"case {t}")
        seen_codes.update(want_codes)
        moved += int(m > 1 and not np.array_equal(codes[ref], codes))
    assert seen_codes == {REASON_COOCCURRENCE, REASON_MF, REASON_POPULARITY,
                          _bk.REASON_ARTIST, _bk.REASON_OWN}
    assert moved > 1000  # the order moved codes around (an unpermuted gather would show)


def test_blend_scores_is_the_matrix_product() -> None:
    """``blend_scores(X, w, eps)`` = ``X @ w + eps * X[:, 0]`` to 1e-12."""
    rng = np.random.default_rng(9)
    for t in range(500):
        m = int(rng.integers(0, 200))
        X = rng.normal(size=(m, N_FEATURES)) * (rng.random((m, N_FEATURES)) > 0.3)
        w = rng.normal(size=N_FEATURES)
        got = _bk.blend_scores(X, w, PRIOR_EPS)
        assert got.shape == (m,)
        if m:
            assert np.abs(got - (X @ w + PRIOR_EPS * X[:, 0])).max() <= 1e-12, t


@pytest.mark.parametrize("shape", [(2, N_FEATURES + 1), (2, N_FEATURES - 1), (N_FEATURES,),
                                   (1, 2, N_FEATURES)])
def test_learned_blend_score_refuses_a_wrong_shape(shape: tuple[int, ...]) -> None:
    """The compiled product reads ``w`` unchecked: a row longer than ``w`` would read past
    it. ``LearnedBlend.score`` checks the shape first."""
    from stream.core.models.blend import LearnedBlend

    blend = LearnedBlend(seed=1)
    with pytest.raises(ValueError, match="shape"):
        blend.score(np.ones(shape))
    assert blend.score(np.ones((2, N_FEATURES))).shape == (2,)
    assert blend.score(np.ones((0, N_FEATURES))).shape == (0,)


def test_blend_rank_is_matrix_then_scores_then_order() -> None:
    """``blend_rank`` = ``blend_matrix``, ``blend_scores`` and ``blend_order`` in turn, to
    the bit (the same floats, the same order), over random inputs with NaN MF scores
    and zero ones."""
    rng = np.random.default_rng(11)
    skip = _trained_skip(rng)
    pops = [_popularity(rng, 0), _popularity(rng, 2000)]
    moved = 0
    for t in range(600):
        m = int(rng.integers(1, 120))
        cands = np.sort(rng.permutation(_SIZE)[:m]).astype(np.int64)
        comp = np.abs(rng.normal(size=(m, 6))) * (rng.random((m, 6)) > 0.5)
        lead = rng.integers(-1, _SIZE, m).astype(np.int64)
        last = rng.random((m, 2)) * (rng.random((m, 2)) > 0.6)
        pop_w, pop_total = pops[t % 2].score_inputs()
        mf = rng.normal(size=m) * (0.0 if t % 3 == 0 else 1.0)
        if m > 3 and t % 17 == 0:
            mf[1] = np.nan
        same = (rng.random(m) > 0.7).astype(np.float64)
        share = rng.random(m) * (rng.random(m) > 0.5)
        first = rng.integers(0, 10**12, _SIZE) * (rng.random(_SIZE) > 0.1)
        query = Interaction("u", ts_ms=1, session_position=int(rng.integers(0, 40)),
                            recent_skip_rate=float(rng.random()))
        args = (pop_w, pop_total, mf, *skip.logit_terms(query), same, share, first,
                int(rng.integers(0, 2 * 10**12)), float(rng.random()), *rng.random(3),
                _DAY_MS, last)
        w = rng.normal(size=N_FEATURES)
        last_row = int(rng.integers(-1, _SIZE))
        want_X = np.full((m, N_FEATURES), -7.0)
        _bk.blend_matrix(cands, comp, *args, want_X)
        scores = _bk.blend_scores(want_X, w, PRIOR_EPS)
        want = _bk.blend_order(scores, cands, comp, lead, last_row)
        X = np.full((m, N_FEATURES), -9.0)
        got = _bk.blend_rank(cands, comp, lead, *args, X, w, PRIOR_EPS, last_row)
        np.testing.assert_array_equal(X, want_X, err_msg=f"case {t}")
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"case {t}")
        moved += int(m > 1 and not np.array_equal(got[0], np.arange(m)))
    assert moved > 500  # the order is not the candidates' (a skipped sort would show)


def test_learned_blend_score_inputs_refuse_another_width() -> None:
    """``blend_rank`` reads ``w`` unchecked: ``score_inputs`` checks the rows' width."""
    from stream.core.models.blend import LearnedBlend

    blend = LearnedBlend(seed=1)
    for n in (N_FEATURES - 1, N_FEATURES + 1, 0):
        with pytest.raises(ValueError, match="features"):
            blend.score_inputs(n)
    w, eps = blend.score_inputs(N_FEATURES)
    assert eps == PRIOR_EPS and w.tolist() == blend.weights.tolist()


def test_logit_terms_at_is_logit_terms_of_the_interaction() -> None:
    """``SkipClassifier.logit_terms_at`` (a learned ranking's path, no ``Interaction``) gives
    ``logit_terms``' floats exactly, contexts (known, unknown, none) and negative
    positions included, on a model that learned context weights."""
    from stream.core.contexts import CONTEXTS

    rng = np.random.default_rng(11)
    skip = _trained_skip(rng)
    contexts = [None, "", "not-a-context", *CONTEXTS]
    for i in range(400):
        skip.learn_one(Interaction("u", "t", 1_700_000_000_000 + i * 611_000,
                                   session_position=i % 7, context=contexts[i % len(contexts)],
                                   skipped=i % 4 == 0, features={"mf": rng.normal()}))
    assert sum(1 for n in skip.classifier.weights if n.startswith("context=")) >= 2
    for i in range(600):
        ts, pos = int(rng.integers(0, 2 * 10**12)), int(rng.integers(-2, 50))
        rate, ctx = float(rng.random()), contexts[i % len(contexts)]
        want = skip.logit_terms(Interaction("u", ts_ms=ts, session_position=pos,
                                            recent_skip_rate=rate, context=ctx))
        assert skip.logit_terms_at(ts, pos, rate, ctx) == want, (i, ctx)
    assert skip.logit_terms_at(5, 3, 0.4) == skip.logit_terms(
        Interaction("u", ts_ms=5, session_position=3, recent_skip_rate=0.4))
