"""CERTIFY / PREDICT: known-truth statistics, invariances and input checks.

Known truth: the threshold classifier f(x) = [x_0 > 1/2] (first pixel) has the smoothed
top-class probability pA = Phi(|v - 1/2| / sigma) at an image with first pixel v, so its true
certified radius sigma * Phi^-1(pA) is exactly the distance |v - 1/2| to the decision boundary.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import rsjax
from rsjax.core.certify import Smoother, keys_for
from rsjax.core.stats import clopper_pearson_lower
from rsjax.errors import RsjaxError


def threshold(x):
    v = x[:, 0, 0, 0]
    return jnp.stack([0.5 - v, v - 0.5, jnp.full_like(v, -10.0)], axis=-1)


def images(values, shape=(2, 2, 1)):
    x = np.zeros((len(values), *shape), np.float32)
    x[:, 0, 0, 0] = values
    return x


def binned_chisquare(observed_k, n, p, min_expected=5.0):
    """Chi-square goodness of fit of integer samples to Binomial(n, p), tail bins merged."""
    pmf = stats.binom.pmf(np.arange(n + 1), n, p) * len(observed_k)
    obs = np.bincount(observed_k, minlength=n + 1).astype(float)
    edges, acc = [0], 0.0
    for k in range(n + 1):  # cut bins at >= min_expected expected counts
        acc += pmf[k]
        if acc >= min_expected:
            edges.append(k + 1)
            acc = 0.0
    edges[-1] = n + 1
    e = np.array([pmf[a:b].sum() for a, b in zip(edges[:-1], edges[1:])])
    o = np.array([obs[a:b].sum() for a, b in zip(edges[:-1], edges[1:])])
    return stats.chisquare(o, e * o.sum() / e.sum()).pvalue


@pytest.mark.parametrize("margin_sd", [0.5, 1.5])
def test_known_truth_radius_distribution_and_failure_rate(margin_sd):
    sigma, n0, n, alpha, M = 0.25, 100, 200, 0.1, 1000
    margin = margin_sd * sigma  # true radius
    pA = stats.norm.cdf(margin_sd)
    x = images(np.full(M, 0.5 + margin))
    pred, radius, pA_lower = rsjax.certify(threshold, x, sigma=sigma, n0=n0, n=n, alpha=alpha, key=7, batch_size=500)

    # 1. too large a certificate (wrong class, or radius beyond the true one) at most at rate alpha:
    #    the count must stay below the 0.9999 quantile of Binomial(M, alpha)
    failures = int(np.sum((pred != -1) & ((pred != 1) | (radius > margin))))
    limit = stats.binom.ppf(0.9999, M, alpha)
    assert failures <= limit
    # ... and the check has power: the plug-in estimate nA/n instead of the bound fails it
    assert (pred == 1).all()  # selection with n0 = 100 is right here
    nA = np.rint(np.interp(pA_lower, clopper_pearson_lower(np.arange(n + 1), n, alpha), np.arange(n + 1))).astype(int)
    np.testing.assert_allclose(clopper_pearson_lower(nA, n, alpha), pA_lower, rtol=0, atol=1e-12)
    naive = sigma * stats.norm.ppf(np.clip(nA / n, 1e-9, 1 - 1e-9))
    assert np.sum(naive > margin) > limit

    # 2. the radii are right in distribution: n_A ~ Binomial(n, pA) exactly, so its histogram
    #    passes a chi-square test against it, and fails against pA shifted by 0.03
    assert binned_chisquare(nA, n, pA) > 1e-3
    assert binned_chisquare(nA, n, min(pA + 0.03, 0.999)) < 1e-3
    # the mean radius matches its exact expectation sum_k P(nA = k) R(k) within 4 standard errors
    k = np.arange(n + 1)
    cp = clopper_pearson_lower(k, n, alpha)
    r_k = np.where(cp >= 0.5, sigma * stats.norm.ppf(np.maximum(cp, 0.5)), 0.0)
    w = stats.binom.pmf(k, n, pA)
    mean, sd = (w * r_k).sum(), np.sqrt((w * r_k**2).sum() - (w * r_k).sum() ** 2)
    assert abs(radius.mean() - mean) < 4 * sd / np.sqrt(M)


def test_known_truth_predict():
    M, n, alpha = 600, 100, 0.1
    # on the boundary both classes have probability 1/2: answering at all is an error,
    # which PREDICT may make with probability <= alpha
    on = rsjax.predict(threshold, images(np.full(M, 0.5)), sigma=0.25, n=n, alpha=alpha, key=1)
    assert set(np.unique(on)) <= {-1, 0, 1}
    assert np.sum(on != -1) <= stats.binom.ppf(0.9999, M, alpha)
    # pA = Phi(1) = 0.84: mostly class 1, class 0 (wrong) at most at rate alpha
    off = rsjax.predict(threshold, images(np.full(M, 0.75)), sigma=0.25, n=n, alpha=alpha, key=1)
    assert np.sum(off == 0) <= stats.binom.ppf(0.9999, M, alpha)
    assert np.mean(off == 1) > 0.9


def linear_f(num_classes=5, d=12, seed=0):
    W = jax.random.normal(jax.random.key(seed), (d, num_classes))
    return lambda x: x.reshape(x.shape[0], -1) @ W


LINEAR = linear_f()  # one f for all tests: certify caches its compiled counters per f


def test_results_do_not_depend_on_batch_size_order_or_neighbours():
    f = LINEAR
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(9, 2, 2, 3)).astype(np.float32)
    idx = np.arange(100, 109)
    sigma = rng.uniform(0.2, 1.0, size=9)
    ref = rsjax.certify(f, x, sigma=sigma, n0=30, n=300, alpha=0.01, key=5, idx=idx, batch_size=1000)
    for bs in (3,):
        got = rsjax.certify(f, x, sigma=sigma, n0=30, n=300, alpha=0.01, key=5, idx=idx, batch_size=bs)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)
    perm = rng.permutation(9)[:4]  # a subset, in another order
    got = rsjax.certify(f, x[perm], sigma=sigma[perm], n0=30, n=300, alpha=0.01, key=5, idx=idx[perm], batch_size=3)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b[perm])
    p_ref = rsjax.predict(f, x, sigma=sigma, n=300, alpha=0.01, key=5, idx=idx, batch_size=1000)
    p_got = rsjax.predict(f, x[perm], sigma=sigma[perm], n=300, alpha=0.01, key=5, idx=idx[perm], batch_size=3)
    np.testing.assert_array_equal(p_got, p_ref[perm])


def test_seed_and_jax_key_agree_and_streams_differ():
    f = LINEAR
    x = np.random.default_rng(1).uniform(size=(4, 2, 2, 3)).astype(np.float32)
    a = rsjax.certify(f, x, sigma=0.5, n0=20, n=200, alpha=0.01, key=3)
    b = rsjax.certify(f, x, sigma=0.5, n0=20, n=200, alpha=0.01, key=jax.random.key(3))
    c = rsjax.certify(f, x, sigma=0.5, n0=20, n=200, alpha=0.01, key=jax.random.PRNGKey(3))
    for u, v, w in zip(a, b, c):
        np.testing.assert_array_equal(u, v)
        np.testing.assert_array_equal(u, w)
    d = rsjax.certify(f, x, sigma=0.5, n0=20, n=200, alpha=0.01, key=4)
    assert not np.array_equal(a[2], d[2])
    sel, est = keys_for(3, np.arange(2), "select"), keys_for(3, np.arange(2), "estimate")
    assert not np.array_equal(jax.random.key_data(sel), jax.random.key_data(est))


def test_scalar_sigma_equals_per_image_sigma():
    f = LINEAR
    x = np.random.default_rng(2).uniform(size=(3, 2, 2, 3)).astype(np.float32)
    sigmas = np.array([0.25, 0.5, 1.0])
    both = rsjax.certify(f, x, sigma=sigmas, n0=20, n=200, alpha=0.01)
    for i, s in enumerate(sigmas):
        one = rsjax.certify(f, x[i:i + 1], sigma=s, n0=20, n=200, alpha=0.01, idx=[i])
        assert one[0][0] == both[0][i] and one[1][0] == both[1][i]


def test_smoother_group_padding_matches():
    f = LINEAR
    x = np.random.default_rng(3).uniform(size=(5, 2, 2, 3)).astype(np.float32)
    sm = Smoother(f, 5, batch_size=40)
    k = keys_for(0, np.arange(5), "estimate")
    full = sm.counts(x, np.full(5, 0.5), k, 100, group=5)
    padded = sm.counts(x, np.full(5, 0.5), k, 100, group=2)  # groups 2, 2, 1 (padded)
    np.testing.assert_array_equal(full, padded)
    assert (full.sum(1) == 100).all()


@pytest.mark.parametrize("kw,msg", [
    (dict(sigma=0.0), "sigma must be > 0"),
    (dict(sigma=-1.0), "sigma must be > 0"),
    (dict(sigma=[0.5, 0.0]), "sigma must be > 0"),
    (dict(alpha=0.0), "alpha must be in (0, 1)"),
    (dict(alpha=1.0), "alpha must be in (0, 1)"),
    (dict(n0=0), "n0 must be an integer >= 1"),
    (dict(n=0), "n must be an integer >= 1"),
    (dict(idx=[3, 3]), "repeats"),
    (dict(key=1.5), "key must be"),
    (dict(key="abc"), "key must be"),
])
def test_bad_input_one_line(kw, msg):
    args = dict(sigma=0.5, n0=10, n=10, alpha=0.01)
    args.update(kw)
    with pytest.raises(RsjaxError) as e:
        rsjax.certify(threshold, images([0.2, 0.7]), **args)
    assert msg in str(e.value) and "\n" not in str(e.value)
