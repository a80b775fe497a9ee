"""rsjax.models.pool.max_pool_2x2: nn.max_pool's function and gradient, ties included."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rsjax.models.pool import max_pool_2x2


def test_value_and_gradient_equal_nn_max_pool_with_ties():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8, 6, 5)).astype(np.float32)
    x = np.maximum(x, 0)  # after a ReLU: windows of tied zeros
    x[0, 0:2, 0:2, 0] = 1.5  # a window of four tied positive maxima
    x = jnp.asarray(x)
    ref = lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))  # noqa: E731
    np.testing.assert_array_equal(max_pool_2x2(x), ref(x))
    w = jnp.asarray(rng.standard_normal((3, 4, 3, 5)).astype(np.float32))
    g = jax.grad(lambda v: (max_pool_2x2(v) * w).sum())(x)
    g_ref = jax.grad(lambda v: (ref(v) * w).sum())(x)
    np.testing.assert_array_equal(g, g_ref)
    assert float(g[0, 0, 0, 0]) == float(w[0, 0, 0, 0]) and float(g[0, 1, 1, 0]) == 0.0  # the first maximiser
