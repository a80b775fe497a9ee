"""The on-device counter: exact invariances and a known-truth distribution check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from rsjax.core.sampler import choose_layout, image_keys, make_counter


def threshold_classifier(x):
    """Class 1 iff the first pixel > 0.5, else class 0 (3 classes, class 2 never wins)."""
    v = x[:, 0, 0, 0]
    return jnp.stack([0.5 - v, v - 0.5, jnp.full_like(v, -10.0)], axis=-1)


def images(values):
    x = np.zeros((len(values), 2, 2, 1), np.float32)
    x[:, 0, 0, 0] = values
    return jnp.asarray(x)


def test_counts_sum_and_mask_partial_last_step():
    counts = make_counter(threshold_classifier, 3, samples_per_step=7)
    x = images([0.3, 0.5, 0.9])
    c = np.asarray(counts(x, jnp.full(3, 0.25), image_keys(0, np.arange(3)), num=50))
    assert c.shape == (3, 4)  # K classes and the non-finite column
    assert (c.sum(axis=1) == 50).all()  # 50 is not a multiple of 7: the tail is masked
    assert (c[:, 2] == 0).all() and (c[:, 3] == 0).all()


def test_same_draws_whatever_the_layout_or_the_neighbours():
    x = images([0.45, 0.55, 0.5, 0.6])
    sigma = jnp.asarray([0.1, 0.2, 0.3, 0.4])
    keys = image_keys(3, np.array([10, 11, 12, 13]))
    ref = np.asarray(make_counter(threshold_classifier, 3, samples_per_step=1000)(x, sigma, keys, num=1000))
    for b in (1, 13, 250):
        got = np.asarray(make_counter(threshold_classifier, 3, samples_per_step=b)(x, sigma, keys, num=1000))
        np.testing.assert_array_equal(got, ref)
    # one image alone gives the same counts as in a batch of four
    alone = make_counter(threshold_classifier, 3, samples_per_step=64)(x[2:3], sigma[2:3], keys[2:3], num=1000)
    np.testing.assert_array_equal(np.asarray(alone)[0], ref[2])


def test_offset_splits_the_stream_exactly():
    counts = make_counter(threshold_classifier, 3, samples_per_step=16)
    x, s, k = images([0.52]), jnp.asarray([0.3]), image_keys(1, np.array([5]))
    whole = counts(x, s, k, num=300)
    parts = counts(x, s, k, num=120) + counts(x, s, k, num=180, offset=120)
    np.testing.assert_array_equal(np.asarray(parts), np.asarray(whole))


def test_purposes_and_indices_give_different_streams():
    counts = make_counter(threshold_classifier, 3, samples_per_step=100)
    x, s = images([0.5]), jnp.asarray([0.5])
    a = counts(x, s, image_keys(0, np.array([0]), "select"), num=2000)
    b = counts(x, s, image_keys(0, np.array([0]), "estimate"), num=2000)
    c = counts(x, s, image_keys(0, np.array([1]), "select"), num=2000)
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_counts_follow_the_known_binomial_law():
    """P[class 1] = P[v + sigma*eps > 0.5] = Phi((v - 0.5)/sigma): counts are Binomial(num, p)."""
    v = np.array([0.40, 0.50, 0.55, 0.70, 0.30])
    sigma = np.array([0.25, 0.5, 0.1, 0.25, 1.0], np.float32)
    num = 20000
    counts = make_counter(threshold_classifier, 3, samples_per_step=500)
    c = np.asarray(counts(images(v), jnp.asarray(sigma), image_keys(7, np.arange(5)), num=num))
    p = stats.norm.cdf((v - 0.5) / sigma)
    # two-sided exact binomial test per image; with a fixed seed all must pass at 1e-3
    pvals = [stats.binomtest(int(k), num, pi).pvalue for k, pi in zip(c[:, 1], p)]
    assert min(pvals) > 1e-3, (c[:, 1] / num, p, pvals)


def test_sigma_is_traced_no_recompilation():
    traces = []

    def f(x):
        traces.append(1)
        return threshold_classifier(x)

    counts = make_counter(f, 3, samples_per_step=10)
    x, k = images([0.5, 0.5]), image_keys(0, np.arange(2))
    for s in (0.1, 0.2, 0.7):
        counts(x, jnp.asarray([s, 2 * s]), k, num=20)
    assert len(traces) == 1


@pytest.mark.parametrize(
    "m, num, batch, expect", [(10, 100, 1000, (10, 100)), (3, 100, 1000, (3, 100)), (10, 100000, 1000, (1, 1000)), (5, 10, 4, (1, 4))]
)
def test_choose_layout(m, num, batch, expect):
    assert choose_layout(m, num, batch) == expect


def test_weights_travel_as_an_argument_not_as_constants():
    """A classifier carrying its weights (f.apply(f.variables, x), as load_classifier's) is compiled
    without them: the counter's computation takes them as an argument (no 16x3 weight constant in
    its HLO, where the closure version has one) and gives the closure version's counts."""
    import flax.linen as nn

    from rsjax.core.sampler import split_weights

    net = nn.Dense(3)
    x = jnp.linspace(0, 1, 2 * 4 * 4 * 1).reshape(2, 4, 4, 1)
    keys, sigma = image_keys(0, np.array([0, 1])), jnp.array([0.3, 0.6])

    def apply(w, z):
        return net.apply(w, z.reshape(z.shape[0], -1))

    v = net.init(jax.random.key(1), jnp.zeros((1, 16)))
    g = lambda z: apply(v, z)  # noqa: E731
    g.apply, g.variables = apply, v
    assert split_weights(g) == (apply, v) and split_weights(lambda z: z)[1] is None

    carrying = make_counter(g, 3, samples_per_step=8)
    closure = make_counter(lambda z: apply(v, z), 3, samples_per_step=8)  # no attributes
    np.testing.assert_array_equal(np.asarray(carrying(x, sigma, keys, num=40)),
                                  np.asarray(closure(x, sigma, keys, num=40)))

    def hlo(counter):
        return counter.jitted.lower(counter.weights, x, sigma, keys, num=40).as_text()

    weight_constant = "tensor<16x3xf32>"
    assert weight_constant in hlo(carrying)  # as the type of an argument...
    assert not any("constant" in line and weight_constant in line for line in hlo(carrying).splitlines())
    assert any("constant" in line and weight_constant in line for line in hlo(closure).splitlines())
