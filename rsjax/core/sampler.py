"""The on-device Monte Carlo primitive of randomized smoothing (Cohen et al. 2019, SAMPLE).

For each image x_i (i = 1..M) and noise level sigma_i, draw ``num`` noisy copies

    x_i + sigma_i * eps_ij,   eps_ij ~ N(0, I),   j = offset, ..., offset + num - 1

run the base classifier ``f`` on them, take the argmax and histogram it into
``counts[i, c] = #{j : argmax_c f(x_i + sigma_i eps_ij) = c}``.

Everything happens inside one jitted function: noise generation, the forward passes
(``lax.scan`` over steps of ``samples_per_step`` copies of each of the M images, so one
device step evaluates ``M * samples_per_step`` inputs), the argmax and the counting.
Nothing per-sample crosses to the host; only the ``(M, K)`` integer counts come back.

Randomness: sample j of image i uses ``eps_ij = normal(fold_in(key_i, j))``, so the draw of a
given sample depends only on the image's key and the sample's index - never on the batch
size, the number of images in flight, or which other images share the batch. An image's
key comes from ``image_keys(seed, dataset_index, purpose)``; different purposes
(selection with n0, estimation with n, sigma search, ...) give independent streams.

sigma is a traced argument (one value per image), so changing it never recompiles; the
smoothing core knows nothing about the architecture, only the pure function ``f``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Independent random streams per image. Never reuse a stream for two purposes: the
# certificate's soundness relies on selection, estimation and search noise being independent.
PURPOSES = {
    "select": 0,  # n0 draws that pick the candidate class c_A (CERTIFY step 1)
    "estimate": 1,  # n draws that bound p_A (CERTIFY step 2) / PREDICT's draws
    "search": 2,  # draws used to choose sigma (QCRS, Insta-RS)
    "optimize": 3,  # reparameterised noise of DDRS's gradient ascent
    "check": 4,  # QCRS safety check draws
    "train": 5,  # training noise (rsjax train: augmentation, MACER copies, objectives)
}


def purpose_id(purpose) -> int:
    """Map a purpose name (or int) to the integer folded into the image key."""
    if isinstance(purpose, str):
        if purpose not in PURPOSES:
            raise ValueError(f"unknown randomness purpose {purpose!r}; known: {sorted(PURPOSES)}")
        return PURPOSES[purpose]
    return int(purpose)


def image_keys(seed: int, idx, purpose="estimate"):
    """Keys for images with dataset indices ``idx``: fold_in(fold_in(key(seed), idx), purpose).

    Returns a typed key array of shape ``idx.shape``. The key of an image depends only on
    (seed, dataset index, purpose), which makes results invariant to batching and ``--skip``.
    """
    idx = jnp.asarray(idx, dtype=jnp.uint32)
    base = jax.random.key(seed)
    pid = purpose_id(purpose)

    def one(i):
        return jax.random.fold_in(jax.random.fold_in(base, i), pid)

    return jax.vmap(one)(idx.reshape(-1)).reshape(idx.shape)


def sample_noise(key, sample_idx, shape, dtype=jnp.float32):
    """eps_j = N(0, I) of ``shape`` for each sample index j in ``sample_idx`` (one key per j)."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, sample_idx)
    return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(keys)


def noisy_copies(x, sigma, key, sample_idx):
    """x + sigma * eps_j for the samples ``sample_idx`` of one image: shape (len(j), *x.shape)."""
    eps = sample_noise(key, sample_idx, x.shape, x.dtype)
    return x[None] + sigma.astype(x.dtype) * eps


def num_steps(num: int, samples_per_step: int) -> int:
    """ceil(num / samples_per_step): scan length for ``num`` draws per image."""
    return -(-num // samples_per_step)


def scan_counts(f, num_classes: int, x, sigma, keys, offset, *, first, stop, steps: int, b: int):
    """Counts of the draws with local indices ``first <= l < stop`` (``l = first + s*b + t``).

    Runs ``steps`` device steps of ``M * b`` forward passes (``lax.scan``); draw ``l`` of image i
    uses the global sample index ``offset + l``, so its noise is ``normal(fold_in(key_i, offset + l))``
    whatever ``b``, ``first`` or the other images. Draws with ``l >= stop`` are computed and masked.
    ``first`` and ``stop`` may be traced (the data-parallel counter gives each device its range).
    Returns int32 (M, num_classes).
    """
    m = x.shape[0]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (m,))
    offset = jnp.asarray(offset, jnp.uint32)
    first = jnp.asarray(first, jnp.uint32)
    stop = jnp.asarray(stop, jnp.uint32)

    def step(acc, s):
        local = first + s * b + jnp.arange(b, dtype=jnp.uint32)  # draw index within this call
        xn = jax.vmap(noisy_copies, in_axes=(0, 0, 0, None))(x, sigma, keys, offset + local)
        logits = f(xn.reshape((m * b,) + x.shape[1:]))
        pred = jnp.argmax(logits, axis=-1).reshape(m, b)
        valid = (local < stop)[None, :, None]
        hits = jax.nn.one_hot(pred, num_classes, dtype=jnp.int32) * valid
        return acc + hits.sum(axis=1), None

    acc0 = jnp.zeros((m, num_classes), jnp.int32)
    acc, _ = jax.lax.scan(step, acc0, jnp.arange(steps, dtype=jnp.uint32))
    return acc


def balanced_steps(num: int, samples_per_step: int):
    """(steps, b): the fewest steps of at most ``samples_per_step`` draws covering ``num``, with the
    draws spread evenly, ``b = ceil(num / steps)``, so that at most ``steps - 1`` computed draws are
    masked (n = 1000 at 400 per step: 3 steps of 334 instead of 3 of 400 with 200 wasted)."""
    steps = num_steps(num, samples_per_step)
    return steps, -(-num // steps)


def split_weights(f):
    """``(apply, weights)`` with ``apply(weights, x) == f(x)``.

    A classifier that carries its weights - ``f.apply(f.variables, x) == f(x)``, as
    :func:`rsjax.load_classifier`'s does - is split, so that the counters pass the weights to the
    compiled computation as an argument instead of leaving it to JAX whether to embed them as
    constants: the compiled counter then depends only on the architecture and shapes, whatever the
    weights (so persistent-cache entries hold no weights), and it was measured no slower
    (ResNet-110 counter on CPU, width-packed, three interleaved pairs: 535/531/540 samples/s with
    constants, 532/530/538 with arguments).
    Any other ``f`` is used as it is (``weights`` None; what it closes over becomes constants).
    """
    apply, weights = getattr(f, "apply", None), getattr(f, "variables", None)
    if callable(apply) and weights is not None:
        return apply, weights
    return (lambda _, x: f(x)), None


def bind_weights(counts_with, weights):
    """``counts(x, sigma, keys, num, offset=0)`` = ``counts_with(weights, ...)``: the counter API over a
    jitted function that takes the weights first; ``.jitted`` and ``.weights`` are kept for inspection
    (e.g. ``counts.jitted.lower(counts.weights, ...)``)."""

    def counts(x, sigma, keys, num: int, offset=0):
        return counts_with(weights, x, sigma, keys, num=num, offset=offset)

    counts.jitted, counts.weights = counts_with, weights
    return counts


def make_counter(f, num_classes: int, *, samples_per_step: int, devices=None):
    """Build ``counts(x, sigma, keys, num, offset=0) -> int32[M, num_classes]``.

    Args:
      f: pure ``logits = f(x)`` for a batch ``(B, H, W, C)``; if it carries its weights
        (``f.apply(f.variables, x)``), they are passed as an argument (:func:`split_weights`).
      num_classes: K, the length of the histogram.
      samples_per_step: at most this many noisy copies of *each* image per device step; one
        step runs f on ``M * b`` inputs with ``b = ceil(num / steps)`` and the fewest ``steps``
        (:func:`balanced_steps`); the few extra draws of the last step are computed but masked.
      devices: devices to split the draws over (default: all local devices). With more than
        one, :func:`rsjax.parallel.make_parallel_counter` gives each device a contiguous range
        of the ``num`` draw indices and sums the counts: the same counts as one device.

    The returned function is jitted with ``num`` static (one compilation per distinct
    (M, num) pair, e.g. n0 and n) and takes
      x: float (M, H, W, C) clean images in [0, 1];
      sigma: float (M,) noise level per image (traced: no recompilation when it changes);
      keys: typed keys (M,) from :func:`image_keys`;
      offset: first sample index (traced), so ``num`` draws can be split across calls
        without changing which noise is drawn: counts(.., a, 0) + counts(.., b, a) equals
        counts(.., a + b, 0).
    """
    if samples_per_step < 1:
        raise ValueError(f"samples_per_step must be >= 1, got {samples_per_step}")
    devices = list(jax.local_devices() if devices is None else devices)
    if len(devices) > 1:
        from rsjax.parallel import make_parallel_counter

        return make_parallel_counter(f, num_classes, samples_per_step=samples_per_step, devices=devices)

    apply, weights = split_weights(f)

    @functools.partial(jax.jit, static_argnames=("num",))
    def counts_with(weights, x, sigma, keys, num: int, offset=0):
        steps, b = balanced_steps(num, samples_per_step)
        return scan_counts(functools.partial(apply, weights), num_classes, x, sigma, keys, offset,
                           first=0, stop=num, steps=steps, b=b)

    return bind_weights(counts_with, weights)


def choose_layout(num_images: int, num: int, batch_size: int):
    """How to fill a forward batch of ``batch_size``: (images in flight M, samples_per_step b).

    With a large ``num`` (CERTIFY's n = 100,000) one image fills the batch; with a small
    ``num`` (n0 = 100, or a small n) several images share each step, so the device is not
    latency-bound: b = min(num, batch_size), M = max(1, batch_size // b), capped by the
    number of images available.
    """
    b = max(1, min(num, batch_size))
    m = max(1, min(num_images, batch_size // b))
    return m, b
