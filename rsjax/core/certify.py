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

Non-finite logits. A draw whose logits are not all finite is no vote for any class (it still
counts among the n trials, so it only lowers pA_lower); the number of such draws per image is
returned by :class:`Smoother` (``nonfinite``) and :func:`certify` / :func:`predict` warn
(``RuntimeWarning``) when there were any.

Randomness. ``key`` is either an integer seed or a JAX PRNG key, and ``idx`` the images'
dataset indices (default ``arange(M)``, each in [0, 2**32)). Image i uses the keys
:func:`rsjax.core.sampler.image_keys` ``(key, idx[i], purpose)`` with purpose ``select``
(n0 draws) or ``estimate`` (n draws, also PREDICT's), so ``key=s`` and ``key=jax.random.key(s)``
agree, and an image gets the same result whatever the batch size, the other images passed
with it, or their order. To reproduce one row of ``rsjax certify ... --seed s`` pass
``key=s, idx=[its idx]``. Never certify two different inputs under the same (key, idx): their
noise would be the same draws.

All Monte Carlo work runs on the device (:class:`rsjax.core.sampler.Counter`); only the
(M, K + 1) counts come back, and the statistics run on the host with scipy
(:mod:`rsjax.core.stats`).
"""

from __future__ import annotations

import warnings
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from rsjax.core import stats
from rsjax.core.batching import DEFAULT_BATCH_SIZE
from rsjax.core.sampler import MAX_INDEX, Counter, image_keys
from rsjax.errors import RsjaxError, check_alpha, check_count

RANGE_SLACK = 1e-6  # float images may exceed [0, 1] by this much (rounding) before they are refused
MAX_DRAWS = 2 ** 31 - 1  # counts are int32 on the device


def check_images(x, *, input_shape=None, check_range=True, idx=None):
    """``x`` as float32 (M, H, W, C) images in [0, 1], or :class:`RsjaxError` naming the problem.

    Refused: a non-array or an integer dtype (images must be float in [0, 1]: divide uint8 by
    255); not 4-D (one image is ``x[None]``); channels first (NCHW); an (H, W, C) other than
    ``input_shape``; a NaN or infinite value (the message names the dataset index ``idx[i]``,
    or the position when ``idx`` is None); with ``check_range``, values outside [0, 1] by more
    than ``RANGE_SLACK`` (pass ``check_range=False`` for a model defined on another range).
    """
    try:
        arr = np.asarray(x)
    except Exception as e:  # noqa: BLE001 - anything numpy cannot read as one array
        raise RsjaxError(f"images must be an array (M, H, W, C), got {type(x).__name__} ({e})") from None
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.integer):
        raise RsjaxError(f"images must be float in [0, 1], got dtype {arr.dtype} (divide 0-255 images by 255)")
    if not np.issubdtype(arr.dtype, np.floating):
        raise RsjaxError(f"images must be float in [0, 1], got dtype {arr.dtype}")
    if arr.ndim != 4:
        hint = " (one image: pass x[None])" if arr.ndim == 3 else ""
        raise RsjaxError(f"images must be a batch (M, H, W, C), got shape {tuple(arr.shape)}{hint}")
    shape = tuple(arr.shape[1:])
    if input_shape is not None:
        want = tuple(int(v) for v in input_shape)
        if shape != want:
            if shape == (want[2], want[0], want[1]):
                raise RsjaxError(f"images are channels-first (M, C, H, W) {tuple(arr.shape)}; the model expects "
                                 f"(M, H, W, C) with (H, W, C) = {want}: pass x.transpose(0, 2, 3, 1)")
            raise RsjaxError(f"images have (H, W, C) = {shape} but the model expects {want}")
    elif shape[0] in (1, 3) and shape[2] not in (1, 3) and shape[1] == shape[2]:
        raise RsjaxError(f"images look channels-first (M, C, H, W) {tuple(arr.shape)}; pass (M, H, W, C), "
                         f"e.g. x.transpose(0, 2, 3, 1)")
    arr = arr.astype(np.float32, copy=False)
    where = idx if idx is not None else np.arange(arr.shape[0])
    finite = np.isfinite(arr).reshape(arr.shape[0], -1).all(axis=1)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise RsjaxError(f"image {int(np.asarray(where)[i])} has NaN or infinite values")
    if check_range and arr.size:
        lo, hi = arr.reshape(arr.shape[0], -1).min(axis=1), arr.reshape(arr.shape[0], -1).max(axis=1)
        bad = (lo < -RANGE_SLACK) | (hi > 1 + RANGE_SLACK)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise RsjaxError(f"image {int(np.asarray(where)[i])} has values in [{lo[i]:g}, {hi[i]:g}], outside [0, 1]; "
                             f"images must be float in [0, 1] (pass check_range=False for a model on another range)")
    return arr


def infer_num_classes(f, image_shape) -> int:
    """K, the length of f's logits, from an abstract evaluation (no computation); RsjaxError when
    ``f`` is not callable, fails on a batch of that shape, or does not return (B, K) logits."""
    if not callable(f):
        raise RsjaxError(f"f must be a function logits = f(x), got {type(f).__name__}")
    try:
        out = jax.eval_shape(f, jax.ShapeDtypeStruct((2, *image_shape), jnp.float32))
    except Exception as e:  # noqa: BLE001 - one line for a user function that fails on this shape
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RsjaxError(f"f fails on a batch of shape {(2, *image_shape)}: {type(e).__name__}: {first}") from None
    shape = getattr(out, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != 2 or shape[1] < 1:
        raise RsjaxError(f"f must return logits of shape (B, num_classes); for a batch of 2 it returned "
                         f"{shape if shape is not None else type(out).__name__}")
    return int(shape[1])


def keys_for(key, idx, purpose):
    """Per-image keys (typed, shape (M,)): :func:`rsjax.core.sampler.image_keys` with ``key`` (an
    integer seed or a JAX PRNG key) as the base."""
    return image_keys(key, np.asarray(idx), purpose)


def check_sigma(sigma, m):
    """sigma as float (M,): a scalar or one value per image, each > 0 and finite."""
    s = np.asarray(sigma, dtype=np.float64)
    if s.ndim == 0:
        s = np.full(m, float(s))
    if s.shape != (m,):
        raise RsjaxError(f"sigma must be a scalar or have one value per image ({m}), got shape {s.shape}")
    if not np.all(s > 0):
        raise RsjaxError(f"sigma must be > 0, got {s[~(s > 0)][0]}")
    if not np.all(np.isfinite(s)):
        raise RsjaxError(f"sigma must be finite, got {s[~np.isfinite(s)][0]}")
    return s


def check_idx(idx, m):
    """Dataset indices as int64 (M,): integers in [0, 2**32), no repeats (default arange(M))."""
    idx = np.arange(m) if idx is None else np.asarray(idx)
    if idx.shape != (m,) or not np.issubdtype(idx.dtype, np.integer):
        raise RsjaxError(f"idx must be {m} integer dataset indices, got {idx.dtype} of shape {idx.shape}")
    if m and (idx.min() < 0 or idx.max() >= MAX_INDEX):
        raise RsjaxError(f"idx must be in [0, 2**32), got {idx.min() if idx.min() < 0 else idx.max()}")
    if len(np.unique(idx)) != m:
        raise RsjaxError("idx repeats an index: two images would share the same noise")
    return idx.astype(np.int64)


def check_draws(name, value):
    value = check_count(name, value)
    if value > MAX_DRAWS:
        raise RsjaxError(f"{name} must be at most 2**31 - 1 = {MAX_DRAWS}, got {value}")
    return value


class Smoother:
    """CERTIFY and PREDICT for any number of images, the counters compiled once.

    The images go through one :class:`rsjax.core.sampler.Counter` (groups of M images with
    ``samples_per_step`` draws each fill a forward batch of about ``batch_size``; the last group
    padded). Draws depend only on each image's key (see module doc).
    """

    def __init__(self, f, num_classes: int, batch_size: int = DEFAULT_BATCH_SIZE, *, devices=None):
        self.f = f
        self.num_classes = int(num_classes)
        self.batch_size = check_count("batch_size", batch_size)
        self.counter = Counter(f, self.num_classes, self.batch_size, devices=devices)

    def layout(self, num_images: int, num: int):
        """(images per group, draws per image per step) for ``num`` draws."""
        return self.counter.layout(num_images, num)

    def counts(self, x, sigma, keys, num: int, group: int | None = None, progress=None):
        """int64 (M, K + 1) counts of ``num`` draws (column K: non-finite draws); see
        :meth:`rsjax.core.sampler.Counter.counts`."""
        return self.counter.counts(x, sigma, keys, num, group, progress)

    def certify(self, x, sigma, *, n0, n, alpha, key=0, idx=None, group=None, progress=None):
        """CERTIFY for each image; returns (prediction int64[M], radius float64[M],
        pA_lower float64[M], nonfinite int64[M]), ``nonfinite`` the selection and estimation draws
        whose logits were not all finite. ``progress(k)``: called after every k noisy forward passes."""
        x, sigma, idx = _check_inputs(x, sigma, idx)
        n0, n = check_draws("n0", n0), check_draws("n", n)
        check_alpha(alpha)
        K = self.num_classes
        counts0 = self.counts(x, sigma, keys_for(key, idx, "select"), n0, group, progress)
        counts1 = self.counts(x, sigma, keys_for(key, idx, "estimate"), n, group, progress)
        pred, radius, pA = stats.certify_from_counts(counts0[:, :K], counts1[:, :K], sigma, alpha, n=n)
        return pred, radius, pA, counts0[:, K] + counts1[:, K]

    def predict(self, x, sigma, *, n, alpha, key=0, idx=None, group=None, progress=None):
        """PREDICT for each image; returns (prediction int64[M], pvalue float64[M], nonfinite int64[M])."""
        x, sigma, idx = _check_inputs(x, sigma, idx)
        n = check_draws("n", n)
        check_alpha(alpha)
        counts = self.counts(x, sigma, keys_for(key, idx, "estimate"), n, group, progress)
        pred, pvalue = stats.predict_from_counts(counts[:, : self.num_classes], alpha)
        return pred, pvalue, counts[:, self.num_classes]


class CohenRunner:
    """The ``cohen`` certifier's runner (:mod:`rsjax.certifiers`): Cohen et al. (2019) CERTIFY and
    PREDICT on the images of one command, seeded by ``seed`` and the dataset indices, over one
    :class:`Smoother`. Results are dicts of per-image numpy arrays."""

    def __init__(self, classifier, *, seed, batch_size):
        self.seed = seed
        self.smoother = Smoother(classifier.f, int(classifier.meta["num_classes"]), batch_size)
        self._group = 0

    def _group_for(self, x):
        # the largest group seen so far: a smaller last group reuses its compiled layout
        self._group = max(self._group, len(x))
        return self._group

    def certify(self, x, idx, sigma, *, n0, n, alpha, progress=None):
        pred, radius, pa, nonfinite = self.smoother.certify(x, sigma, n0=n0, n=n, alpha=alpha, key=self.seed,
                                                           idx=idx, group=self._group_for(x), progress=progress)
        return {"predict": pred, "radius": radius, "pA_lower": pa, "nonfinite": nonfinite}

    def predict(self, x, idx, sigma, *, n, alpha, progress=None):
        """PREDICT (``predict`` -1 = abstain, ``pvalue`` of the binomial test)."""
        pred, pvalue, nonfinite = self.smoother.predict(x, sigma, n=n, alpha=alpha, key=self.seed, idx=idx,
                                                       group=self._group_for(x), progress=progress)
        return {"predict": pred, "pvalue": pvalue, "nonfinite": nonfinite}


def _check_inputs(x, sigma, idx):
    x = np.asarray(x, np.float32)
    if x.ndim != 4:
        raise RsjaxError(f"x must be a batch of images (M, H, W, C), got shape {tuple(x.shape)}")
    m = x.shape[0]
    return x, check_sigma(sigma, m), check_idx(idx, m)


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


def _prepare(f, x, num_classes, check_range, idx):
    """Validated (images, K) for the public functions (errors as :func:`check_images`)."""
    if not callable(f):
        raise RsjaxError(f"f must be a function logits = f(x), got {type(f).__name__}")
    meta = getattr(f, "meta", None) or {}
    shape = meta.get("input_shape")
    x = check_images(x, input_shape=shape, check_range=check_range, idx=None if idx is None else np.asarray(idx))
    K = infer_num_classes(f, x.shape[1:])
    if num_classes is not None and int(num_classes) != K:
        raise RsjaxError(f"num_classes = {num_classes} but f returns {K} logits")
    return x, K


def _warn_nonfinite(nonfinite, what):
    bad = int(np.count_nonzero(nonfinite))
    if bad:
        warnings.warn(f"{what}: {int(np.sum(nonfinite))} noisy draws of {bad} image(s) gave non-finite logits and "
                      f"counted as no vote (per-image counts: Smoother(f, K).{what}(...)[-1])",
                      RuntimeWarning, stacklevel=3)


def certify(f, x, *, sigma, n0=100, n=100_000, alpha=0.001, key=0, idx=None, batch_size=DEFAULT_BATCH_SIZE,
            num_classes=None, check_range=True):
    """Cohen CERTIFY of the smoothed ``f`` at each image of ``x``.

    Args:
      f: pure ``logits = f(x)`` for float32 (B, H, W, C) in [0, 1], returning (B, K).
      x: float (M, H, W, C) clean images in [0, 1] (:func:`check_images`: integer dtypes, NCHW,
        NaN/inf and values outside [0, 1] are refused).
      sigma: noise level, a scalar or one value per image (each finite and > 0).
      n0: selection draws; n: estimation draws (each in [1, 2**31 - 1]); alpha: in (0, 1).
      key: integer seed or JAX PRNG key; idx: dataset indices of the images (default
        ``arange(M)``, in [0, 2**32)); image i's noise depends only on (key, idx[i]).
      batch_size: forward-pass batch on the device (it never changes the result).
      num_classes: K (default: inferred from f's output shape; if given, it must agree).
      check_range: refuse images outside [0, 1] (False for a model defined on another range).

    Returns ``(prediction int64[M], radius float64[M], pA_lower float64[M])``; abstain is
    prediction -1 with radius 0. Draws with non-finite logits count as no vote and raise a
    ``RuntimeWarning``; :meth:`Smoother.certify` returns their number per image.
    """
    check_alpha(alpha)
    x, K = _prepare(f, x, num_classes, check_range, idx)
    pred, radius, pA, nonfinite = smoother_for(f, K, batch_size).certify(x, sigma, n0=n0, n=n, alpha=alpha,
                                                                          key=key, idx=idx)
    _warn_nonfinite(nonfinite, "certify")
    return pred, radius, pA


def predict(f, x, *, sigma, n=100_000, alpha=0.001, key=0, idx=None, batch_size=DEFAULT_BATCH_SIZE,
            num_classes=None, check_range=True):
    """Cohen PREDICT of the smoothed ``f`` at each image of ``x``; returns prediction int64[M]
    (-1 = abstain). Arguments and checks as in :func:`certify`; the draws are the ``estimate``
    stream."""
    check_alpha(alpha)
    x, K = _prepare(f, x, num_classes, check_range, idx)
    prediction, _, nonfinite = smoother_for(f, K, batch_size).predict(x, sigma, n=n, alpha=alpha, key=key, idx=idx)
    _warn_nonfinite(nonfinite, "predict")
    return prediction


__all__ = ["certify", "predict", "Smoother", "CohenRunner", "check_images", "keys_for", "infer_num_classes", "check_sigma"]
