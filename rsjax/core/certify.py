"""Cohen et al. (2019) CERTIFY and PREDICT for a pure JAX classifier ``logits = f(x)``.

    g(x) = argmax_c P_{eps ~ N(0, I)}[ argmax f(x + sigma * eps) = c ]

CERTIFY(f, sigma, x, n0, n, alpha):
  1. c_A = argmax of the counts of n0 "selection" draws;
  2. n_A = count of c_A among n fresh "estimation" draws;
  3. pA_lower = Beta^{-1}(alpha; n_A, n - n_A + 1) (one-sided Clopper-Pearson);
  4. pA_lower < 1/2 -> abstain (-1, radius 0), else (c_A, sigma * Phi^{-1}(pA_lower)).
With probability >= 1 - alpha the answer is an abstention or g(x), and g is constant on the
L2 ball of that radius around x.

PREDICT(f, sigma, x, n, alpha): the top two classes of n draws, c1 with n1 >= n2; return c1
if the two-sided binomial test of n1 in n1 + n2 at p = 1/2 has p-value <= alpha, else abstain.
A wrong (non-abstaining) answer has probability <= alpha.

Randomness. ``key`` is either an integer seed or a JAX PRNG key, and ``idx`` the images'
dataset indices (default ``arange(M)``). Image i uses the keys
``fold_in(fold_in(base, idx[i]), purpose)`` with base = ``jax.random.key(seed)`` (or the given
key) and purpose ``select`` (n0 draws) or ``estimate`` (n draws, also PREDICT's); these are
exactly :func:`rsjax.core.sampler.image_keys`, so ``key=s`` and ``key=jax.random.key(s)``
agree, and an image gets the same result whatever the batch size, the other images passed
with it, or their order. To reproduce one row of ``rsjax certify ... --seed s`` pass
``key=s, idx=[its idx]``. Never certify two different inputs under the same (key, idx): their
noise would be the same draws.

All Monte Carlo work runs on the device (:func:`rsjax.core.sampler.make_counter`); only the
(M, K) counts come back, and the statistics run on the host with scipy
(:mod:`rsjax.core.stats`).
"""

from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp
import numpy as np

from rsjax.core import stats
from rsjax.core.sampler import choose_layout, image_keys, make_counter, purpose_id
from rsjax.errors import RsjaxError, check_alpha, check_count


def infer_num_classes(f, image_shape) -> int:
    """K, the length of f's logits, from an abstract evaluation (no computation)."""
    out = jax.eval_shape(f, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
    return int(out.shape[-1])


def _is_jax_key(key) -> bool:
    return isinstance(key, jax.Array) and (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or (key.dtype == jnp.uint32 and key.shape == (2,))
    )


def keys_for(key, idx, purpose):
    """Per-image keys (typed, shape (M,)) for dataset indices ``idx`` and a purpose.

    ``key`` an int seed -> :func:`image_keys` (seed, idx, purpose); a JAX key (typed, or a raw
    ``uint32[2]`` from ``PRNGKey``) -> the same derivation with that key as the base, so
    ``keys_for(jax.random.key(s), ...) == keys_for(s, ...)``.
    """
    idx = np.asarray(idx)
    if not _is_jax_key(key):
        try:
            ok = not isinstance(key, (bool, float)) and int(key) == key
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise RsjaxError(f"key must be an integer seed or a JAX PRNG key, got {key!r}")
        return image_keys(int(key), idx, purpose)
    base = key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)
    if base.shape != ():
        raise RsjaxError(f"key must be a single PRNG key, got shape {base.shape}")
    pid = purpose_id(purpose)
    flat = jnp.asarray(idx.reshape(-1), jnp.uint32)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, i), pid))(flat)
    return keys.reshape(idx.shape)


def check_sigma(sigma, m):
    """sigma as float (M,): a scalar or one value per image, each > 0."""
    s = np.asarray(sigma, dtype=np.float64)
    if s.ndim == 0:
        s = np.full(m, float(s))
    if s.shape != (m,):
        raise RsjaxError(f"sigma must be a scalar or have one value per image ({m}), got shape {s.shape}")
    if not np.all(s > 0) or not np.all(np.isfinite(s)):
        bad = s[~((s > 0) & np.isfinite(s))][0]
        raise RsjaxError(f"sigma must be > 0, got {bad}")
    return s


class Smoother:
    """Runs SAMPLE for any number of images with the counters compiled once.

    Images are processed in groups of M (from :func:`choose_layout`: M images with
    ``samples_per_step`` draws each fill one forward batch of about ``batch_size``); the
    last group is padded to M with copies of its first image (their counts are dropped) so
    that no new shape is compiled. Draws depend only on each image's key (see module doc).
    """

    def __init__(self, f, num_classes: int, batch_size: int = 1000):
        self.f = f
        self.num_classes = int(num_classes)
        self.batch_size = check_count("batch_size", batch_size)
        self._counters = {}

    def layout(self, num_images: int, num: int):
        """(images per group, draws per image per step) for ``num`` draws."""
        return choose_layout(num_images, num, self.batch_size)

    def _counter(self, b):
        if b not in self._counters:
            self._counters[b] = make_counter(self.f, self.num_classes, samples_per_step=b)
        return self._counters[b]

    def counts(self, x, sigma, keys, num: int, group: int | None = None):
        """int64 (M, K) counts of ``num`` draws for each image of ``x`` (M, H, W, C).

        ``group``: images per device step (default: as many as ``choose_layout`` allows for
        this ``num``; pass the same value across calls to reuse one compilation).
        """
        # Groups are cut and padded on the host (numpy), so that no eager device op runs on a
        # new shape (each would compile); the counter sees the same (M, ...) shapes every call.
        x = np.asarray(x, np.float32)
        m_total = x.shape[0]
        m, b = self.layout(m_total if group is None else group, num)
        counter = self._counter(b)
        sigma = np.broadcast_to(np.asarray(sigma, np.float32), (m_total,))
        key_data = np.asarray(jax.random.key_data(keys))
        impl = jax.random.key_impl(keys)
        out = []
        for start in range(0, m_total, m):
            sel = np.arange(start, min(start + m, m_total))
            pad = m - len(sel)
            if pad:
                sel = np.concatenate([sel, np.full(pad, start)])
            kg = jax.random.wrap_key_data(key_data[sel], impl=impl)
            c = counter(x[sel], sigma[sel], kg, num=num)
            out.append(np.asarray(c)[: m - pad])
        if not out:
            return np.zeros((0, self.num_classes), np.int64)
        return np.concatenate(out).astype(np.int64)

    def certify(self, x, sigma, *, n0, n, alpha, key=0, idx=None, group=None):
        """CERTIFY for each image; returns (prediction int64[M], radius float64[M], pA_lower float64[M])."""
        x, sigma, idx = _check_inputs(x, sigma, idx)
        n0 = check_count("n0", n0)
        n = check_count("n", n)
        check_alpha(alpha)
        counts0 = self.counts(x, sigma, keys_for(key, idx, "select"), n0, group)
        counts1 = self.counts(x, sigma, keys_for(key, idx, "estimate"), n, group)
        return stats.certify_from_counts(counts0, counts1, sigma, alpha)

    def predict(self, x, sigma, *, n, alpha, key=0, idx=None, group=None):
        """PREDICT for each image; returns (prediction int64[M], pvalue float64[M])."""
        x, sigma, idx = _check_inputs(x, sigma, idx)
        n = check_count("n", n)
        check_alpha(alpha)
        counts = self.counts(x, sigma, keys_for(key, idx, "estimate"), n, group)
        return stats.predict_from_counts(counts, alpha)


def _check_inputs(x, sigma, idx):
    x = np.asarray(x, np.float32)
    if x.ndim != 4:
        raise RsjaxError(f"x must be a batch of images (M, H, W, C), got shape {tuple(x.shape)}")
    m = x.shape[0]
    sigma = check_sigma(sigma, m)
    idx = np.arange(m) if idx is None else np.asarray(idx)
    if idx.shape != (m,) or not np.issubdtype(idx.dtype, np.integer):
        raise RsjaxError(f"idx must be {m} integer dataset indices, got {idx.dtype} of shape {idx.shape}")
    if np.any(idx < 0):
        raise RsjaxError("idx must be >= 0")
    if len(np.unique(idx)) != m:
        raise RsjaxError("idx repeats an index: two images would share the same noise")
    return x, sigma, idx


_SMOOTHERS = weakref.WeakKeyDictionary()


def smoother_for(f, num_classes: int, batch_size: int) -> Smoother:
    """A cached :class:`Smoother` per (f, K, batch_size), so that repeated calls of
    :func:`certify` / :func:`predict` with the same ``f`` reuse the compiled counters."""
    try:
        per_f = _SMOOTHERS.setdefault(f, {})
    except TypeError:  # f not weak-referenceable: no cache
        return Smoother(f, num_classes, batch_size)
    key = (int(num_classes), int(batch_size))
    if key not in per_f:
        per_f[key] = Smoother(f, num_classes, batch_size)
    return per_f[key]


def certify(f, x, *, sigma, n0=100, n=100_000, alpha=0.001, key=0, idx=None, batch_size=1000,
            num_classes=None):
    """Cohen CERTIFY of the smoothed ``f`` at each image of ``x``.

    Args:
      f: pure ``logits = f(x)`` for float32 (B, H, W, C) in [0, 1].
      x: float (M, H, W, C) clean images.
      sigma: noise level, a scalar or one value per image (each > 0).
      n0: selection draws (>= 1); n: estimation draws (>= 1); alpha: in (0, 1).
      key: integer seed or JAX PRNG key; idx: dataset indices of the images (default
        ``arange(M)``); image i's noise depends only on (key, idx[i]) (see module docstring).
      batch_size: forward-pass batch on the device (it never changes the result).
      num_classes: K (default: inferred from f's output shape).

    Returns ``(prediction int64[M], radius float64[M], pA_lower float64[M])``; abstain is
    prediction -1 with radius 0.
    """
    check_alpha(alpha)
    x = jnp.asarray(x, jnp.float32)
    K = num_classes or infer_num_classes(f, x.shape[1:])
    return smoother_for(f, K, batch_size).certify(x, sigma, n0=n0, n=n, alpha=alpha, key=key, idx=idx)


def predict(f, x, *, sigma, n=100_000, alpha=0.001, key=0, idx=None, batch_size=1000, num_classes=None):
    """Cohen PREDICT of the smoothed ``f`` at each image of ``x``; returns prediction int64[M]
    (-1 = abstain). Arguments as in :func:`certify`; the draws are the ``estimate`` stream."""
    check_alpha(alpha)
    x = jnp.asarray(x, jnp.float32)
    K = num_classes or infer_num_classes(f, x.shape[1:])
    prediction, _ = smoother_for(f, K, batch_size).predict(x, sigma, n=n, alpha=alpha, key=key, idx=idx)
    return prediction


__all__ = ["certify", "predict", "Smoother", "keys_for", "infer_num_classes", "check_sigma"]
