"""Toy classifiers with closed-form smoothing for the DDRS / QCRS / Insta-RS tests.

Images are (1, 1, 1): only the first pixel v matters, and eps_1 ~ N(0, 1), so under noise
v + sigma * z with z ~ N(0, 1).
"""

import argparse

import jax.numpy as jnp
import numpy as np
from scipy import stats

# slab: class 0 iff |v - CENTER| < HALF_WIDTH, else class 1
CENTER, HALF_WIDTH = 0.5, 0.4


def slab(x):
    u = x[:, 0, 0, 0] - CENTER
    return jnp.stack([HALF_WIDTH - jnp.abs(u), jnp.abs(u) - HALF_WIDTH], axis=-1)


def slab_pA(sigma, a=0.0):
    """P[|a + sigma z| < m] = Phi((m - a)/sigma) - Phi((-m - a)/sigma) for v = CENTER + a."""
    sigma = np.asarray(sigma, np.float64)
    return stats.norm.cdf((HALF_WIDTH - a) / sigma) - stats.norm.cdf((-HALF_WIDTH - a) / sigma)


def cp_radius_curve(pA, sigma, n, alpha):
    """sigma * Phi^{-1}(CP lower bound at the expected count n pA): the radius the search
    estimates, in the limit of no sampling noise (continuous Beta parameters)."""
    pl = stats.beta.ppf(alpha, n * pA, n * (1 - pA) + 1)
    return sigma * stats.norm.ppf(pl)


def slab_maximiser(n, alpha, lo, hi, a=0.0):
    grid = np.linspace(lo, hi, 40001)
    return grid[np.argmax(cp_radius_curve(slab_pA(grid, a), grid, n, alpha))]


# half-space: class 0 iff v < BOUNDARY; at v = V0 the smoothed classifier g_sigma is the same
# half-space for every sigma, so the true certified radius of g_sigma at x is BOUNDARY - V0.
BOUNDARY, V0 = 0.8, 0.5
TRUE_RADIUS = BOUNDARY - V0


def halfspace(x):
    v = x[:, 0, 0, 0]
    return jnp.stack([BOUNDARY - v, v - BOUNDARY], axis=-1)


def images(values):
    x = np.zeros((len(values), 1, 1, 1), np.float32)
    x[:, 0, 0, 0] = values
    return x


def method_config(method, argv=()):
    """The method's config from command-line flags (method options only), through rsjax.config."""
    from rsjax import config

    p = argparse.ArgumentParser()
    config.add_arguments(p, method.config)
    return config.from_args(method.config, p.parse_args(list(argv)))


def toy(f, meta=None):
    """A toy base classifier as the methods take it (a rsjax.classifier.Classifier)."""
    from rsjax.classifier import Classifier

    return Classifier(f, dict(META if meta is None else meta))


def build(method, argv=(), f=None, meta=None, seed=0, batch=1 << 14, n=None):
    """``method.build`` with the config of ``argv`` on the toy classifier ``f``."""
    return method.build(method_config(method, argv), toy(f, meta), seed=seed, batch_size=batch, n=n)


META = {"num_classes": 2, "input_shape": [1, 1, 1], "sigma": None}
