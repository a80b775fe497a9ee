"""Clopper-Pearson, Cohen radius and PREDICT's binomial test against the spec's golden values."""

import numpy as np
import pytest
from scipy import stats

from rsjax.core.stats import (ABSTAIN, binomial_pvalue, certify_from_counts, clopper_pearson_lower,
                              cohen_radius, predict_from_counts)

# spec section 1.4: (nA, n, pA_lower, Phi^-1(pA_lower), R at sigma .25, .5, 1)
GOLDEN = [
    (100000, 100000, 0.9999309248, 3.811457, 0.952864, 1.905728, 3.811457),
    (99000, 100000, 0.9889893404, 2.290000, 0.5725, 1.1450, 2.2900),
    (90000, 100000, 0.8970364962, 1.264845, 0.316211, 0.632422, 1.264845),
    (60000, 100000, 0.5952010473, 0.240945, 0.060236, 0.120472, 0.240945),
    (10000, 10000, 0.9993094630, 3.198578, 0.799644, 1.599289, 3.198578),
    (500, 500, 0.9862794856, 2.205186, 0.551297, 1.102593, 2.205186),
    (450, 500, 0.8520867646, 1.045425, 0.261356, 0.522713, 1.045425),
    (100, 100, 0.9332543008, 1.500475, None, None, None),
]


@pytest.mark.parametrize("nA,n,pA,z,r25,r50,r100", GOLDEN)
def test_golden_clopper_pearson_and_radius(nA, n, pA, z, r25, r50, r100):
    got = clopper_pearson_lower(nA, n, 1e-3)
    assert got == pytest.approx(pA, abs=1e-10)
    assert cohen_radius(got, 1.0) == pytest.approx(z, abs=1e-6)
    for sigma, r in ((0.25, r25), (0.5, r50), (1.0, r100)):
        if r is not None:
            assert cohen_radius(got, sigma) == pytest.approx(r, abs=1e-4 if r == round(r, 4) else 1e-6)


def test_vectorised_equals_scalar():
    nA = np.array([0, 1, 50, 99, 100])
    vec = clopper_pearson_lower(nA, 100, 0.01)
    assert [clopper_pearson_lower(int(k), 100, 0.01) for k in nA] == list(vec)


def test_edge_cases_nA_zero_and_all():
    assert clopper_pearson_lower(0, 1000, 1e-3) == 0.0  # Beta quantile undefined: guarded to 0
    assert clopper_pearson_lower(1000, 1000, 1e-3) == pytest.approx(1e-3 ** (1 / 1000), rel=1e-12)
    assert clopper_pearson_lower(1, 1, 0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        clopper_pearson_lower(5, 4, 0.1)
    # the bound is a valid one-sided (1 - alpha) bound: P(Bin(n, p) >= nA) = alpha at p = bound
    p = clopper_pearson_lower(37, 60, 0.05)
    assert stats.binom.sf(36, 60, p) == pytest.approx(0.05, rel=1e-6)


def test_certify_decision_abstain_and_ties():
    # image 0: class 2 selected, 100/100 -> certified; image 1: nA = 0 -> abstain;
    # image 2: selection tie between classes 0 and 1 -> first index (0), like numpy argmax
    counts0 = np.array([[0, 1, 99], [90, 10, 0], [5, 5, 0]])
    counts1 = np.array([[0, 0, 100], [0, 100, 0], [100, 0, 0]])
    pred, radius, pA = certify_from_counts(counts0, counts1, np.array([0.5, 0.5, 1.0]), 1e-3)
    assert pred.tolist() == [2, ABSTAIN, 0]
    assert pA[1] == 0.0 and radius[1] == 0.0
    assert radius[0] == pytest.approx(0.5 * 1.500475, abs=1e-6)
    assert radius[2] == pytest.approx(1.500475, abs=1e-6)


def test_pA_lower_exactly_half_predicts_with_radius_zero():
    # nA = n = 1, alpha = 0.5: pA_lower = 0.5 exactly; Cohen abstains only if pA_lower < 0.5
    pred, radius, _ = certify_from_counts(np.array([[0, 1]]), np.array([[0, 1]]), 1.0, 0.5)
    assert pred.tolist() == [1] and radius.tolist() == [0.0]


def test_binomtest_golden_and_predict():
    assert binomial_pvalue(60, 40) == pytest.approx(0.05689, abs=5e-6)
    assert binomial_pvalue(0, 0) == 1.0
    counts = np.array([[60, 40, 0], [0, 3, 97], [50, 50, 0], [10, 0, 0]])
    pred, p = predict_from_counts(counts, 0.06)
    assert p[0] == pytest.approx(0.05689, abs=5e-6)
    assert pred.tolist() == [0, 2, ABSTAIN, 0]
    pred, _ = predict_from_counts(counts, 0.05)
    assert pred.tolist() == [ABSTAIN, 2, ABSTAIN, 0]
