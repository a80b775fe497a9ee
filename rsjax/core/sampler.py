"""The on-device Monte Carlo primitive of randomized smoothing (Cohen et al. 2019, SAMPLE).

For each image x_i (i = 1..M) and noise level sigma_i, draw ``num`` noisy copies

    x_i + sigma_i * eps_ij,   eps_ij ~ N(0, I),   j = offset, ..., offset + num - 1

run the base classifier ``f`` on them, take the argmax and histogram it into
``counts[i, c] = #{j : argmax_c f(x_i + sigma_i eps_ij) = c}``; a draw whose logits are not all
finite is no vote for any class and is counted in the extra column ``counts[i, K]``.

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

Devices: the counter runs over a 1-D mesh (axis ``"d"``) of 1..D devices, one code path. The
``num`` draws of every image are split into D contiguous ranges of ``q = ceil(num / D)`` draw
indices, device d evaluates the draws ``d*q <= l < min((d+1)*q, num)`` of all M images in flight
and the per-device histograms are summed with ``psum``: since draw l's noise depends only on
(key_i, offset + l), the counts are exactly those of one device, and one image with CERTIFY's
n = 100,000 keeps every device busy. Images, sigmas, keys and weights are replicated.

:class:`Counter` cuts any number of images (or of candidate copies of images) into groups of the
compiled shape, pads the last group and caches one compiled counter per draws-per-step; it is the
one entry point of CERTIFY/PREDICT (:mod:`rsjax.core.certify`) and of the methods' searches.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Independent random streams per image. Never reuse a stream for two purposes: the
# certificate's soundness relies on selection, estimation and search noise being independent.
PURPOSES = {
    "select": 0,  # n0 draws that pick the candidate class c_A (CERTIFY step 1)
    "estimate": 1,  # n draws that bound p_A (CERTIFY step 2) / PREDICT's draws
    "search": 2,  # draws used to choose sigma (QCRS, Insta-RS)
    "optimize": 3,  # reparameterised noise of DDRS's gradient ascent
    "check": 4,  # QCRS safety check draws
    "train": 5,  # training noise (rsjax train: augmentation, MACER copies, objectives)
    "patches": 6,  # Smooth-Reduce's random patch corners (drawn once per image)
}


AXIS = "d"
MAX_INDEX = 2 ** 32  # dataset indices and draw indices are folded into keys as uint32


def purpose_id(purpose) -> int:
    """Map a purpose name (or int) to the integer folded into the image key."""
    if isinstance(purpose, str):
        if purpose not in PURPOSES:
            raise ValueError(f"unknown randomness purpose {purpose!r}; known: {sorted(PURPOSES)}")
        return PURPOSES[purpose]
    return int(purpose)


def is_key(key) -> bool:
    """Whether ``key`` is a JAX PRNG key (typed, or a raw ``uint32[2]`` from ``PRNGKey``)."""
    return isinstance(key, jax.Array) and (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or (key.dtype == jnp.uint32 and key.shape == (2,)))


def base_key(seed):
    """``jax.random.key(seed)`` for an integer seed in [-2**63, 2**63); a JAX key is used as it is."""
    from rsjax.errors import RsjaxError

    if is_key(seed):
        key = seed if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(seed)
        if key.shape != ():
            raise RsjaxError(f"key must be a single PRNG key, got shape {key.shape}")
        return key
    try:
        ok = not isinstance(seed, (bool, float, np.floating)) and int(seed) == seed
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise RsjaxError(f"key must be an integer seed or a JAX PRNG key, got {seed!r}")
    if not -(2 ** 63) <= int(seed) < 2 ** 63:
        raise RsjaxError(f"seed must be in [-2**63, 2**63), got {seed}")
    return jax.random.key(int(seed))


def image_keys(seed, idx, purpose="estimate"):
    """Keys for images with dataset indices ``idx``: fold_in(fold_in(key(seed), idx), purpose).

    ``seed`` is an integer or a JAX key (used as the base). Returns a typed key array of shape
    ``idx.shape``. The key of an image depends only on (seed, dataset index, purpose), which makes
    results invariant to batching and ``--skip``. Indices must lie in [0, 2**32): they are folded
    in as uint32, and a larger one would silently reuse a smaller one's noise.
    """
    from rsjax.errors import RsjaxError

    if isinstance(idx, jax.core.Tracer):  # inside jit (training): the caller's indices, checked where they are made
        idx = idx.astype(jnp.uint32)
    else:
        raw = np.asarray(idx)
        if raw.size and (not np.issubdtype(raw.dtype, np.integer) or raw.min() < 0 or raw.max() >= MAX_INDEX):
            bad = raw.reshape(-1)[0] if not np.issubdtype(raw.dtype, np.integer) else (
                raw.min() if raw.min() < 0 else raw.max())
            raise RsjaxError(f"dataset indices must be integers in [0, 2**32), got {bad}")
        idx = jnp.asarray(raw.astype(np.uint32))
    base = base_key(seed)
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


def votes(logits, num_classes: int):
    """The class each draw votes for: argmax of its logits, or ``num_classes`` (no class) when its
    logits are not all finite (a NaN argmaxes to some class, which must never count as a vote)."""
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    return jnp.where(finite, jnp.argmax(logits, axis=-1), num_classes)


def scan_counts(f, num_classes: int, x, sigma, keys, offset, *, first, stop, steps: int, b: int):
    """Counts of the draws with local indices ``first <= l < stop`` (``l = first + s*b + t``).

    Runs ``steps`` device steps of ``M * b`` forward passes (``lax.scan``); draw ``l`` of image i
    uses the global sample index ``offset + l``, so its noise is ``normal(fold_in(key_i, offset + l))``
    whatever ``b``, ``first`` or the other images. Draws with ``l >= stop`` are computed and masked.
    ``first`` and ``stop`` may be traced (each device of the mesh gets its range).
    Returns int32 (M, num_classes + 1); the last column counts the non-finite draws (:func:`votes`).
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
        pred = votes(logits, num_classes).reshape(m, b)
        valid = (local < stop)[None, :, None]
        hits = jax.nn.one_hot(pred, num_classes + 1, dtype=jnp.int32) * valid
        return acc + hits.sum(axis=1), None

    acc0 = jnp.zeros((m, num_classes + 1), jnp.int32)
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
    :func:`rsjax.load_classifier`'s does - is split, so that the counter passes the weights to the
    compiled computation as an argument instead of leaving it to JAX whether to embed them as
    constants: the compiled counter then depends only on the architecture and shapes, whatever the
    weights, so persistent-cache entries hold no weights (speed: docs/throughput.md).
    Any other ``f`` is used as it is (``weights`` None; what it closes over becomes constants).
    """
    apply, weights = getattr(f, "apply", None), getattr(f, "variables", None)
    if callable(apply) and weights is not None:
        return apply, weights
    return (lambda _, x: f(x)), None


def device_mesh(devices=None) -> Mesh:
    """1-D mesh (axis ``"d"``) over ``devices`` (default: this process's local devices)."""
    devices = list(jax.local_devices() if devices is None else devices)
    return Mesh(np.array(devices), (AXIS,))


def make_counter(f, num_classes: int, *, samples_per_step: int, devices=None):
    """Build ``counts(x, sigma, keys, num, offset=0) -> int32[M, num_classes + 1]``.

    Args:
      f: pure ``logits = f(x)`` for a batch ``(B, H, W, C)``; if it carries its weights
        (``f.apply(f.variables, x)``), they are passed as an argument (:func:`split_weights`).
      num_classes: K, the length of the histogram (column K: non-finite draws).
      samples_per_step: at most this many noisy copies of *each* image per device step and device;
        one step runs f on ``M * b`` inputs with ``b = ceil(q / steps)`` and the fewest ``steps``
        (:func:`balanced_steps`, q the device's share of the draws); the few extra draws of the
        last step are computed but masked.
      devices: the devices of the 1-D mesh (default: all local devices); the draws are split over
        them and the counts summed (module doc): the same counts as one device.

    The returned function is jitted with ``num`` static (one compilation per distinct
    (M, num) pair, e.g. n0 and n) and takes
      x: float (M, H, W, C) clean images in [0, 1];
      sigma: float (M,) noise level per image (traced: no recompilation when it changes);
      keys: typed keys (M,) from :func:`image_keys`;
      offset: first sample index (traced), so ``num`` draws can be split across calls
        without changing which noise is drawn: counts(.., a, 0) + counts(.., b, a) equals
        counts(.., a + b, 0).
    ``.jitted`` (taking the weights first) and ``.weights`` are attached for inspection.
    """
    if samples_per_step < 1:
        raise ValueError(f"samples_per_step must be >= 1, got {samples_per_step}")
    mesh = device_mesh(devices)
    n_dev = mesh.devices.size
    apply, weights = split_weights(f)
    if weights is not None:  # replicated once on the mesh (weights committed elsewhere would not fit it)
        weights = jax.device_put(weights, NamedSharding(mesh, P()))

    @functools.partial(jax.jit, static_argnames=("num",))
    def counts_with(weights, x, sigma, keys, num: int, offset=0):
        q = -(-num // n_dev)
        steps, b = balanced_steps(q, samples_per_step)
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (x.shape[0],))
        offset = jnp.asarray(offset, jnp.uint32)

        def per_device(weights, x, sigma, keys, offset):
            d = jax.lax.axis_index(AXIS).astype(jnp.uint32)
            first = d * q
            stop = jnp.minimum(first + q, num)
            acc = scan_counts(functools.partial(apply, weights), num_classes, x, sigma, keys, offset,
                              first=first, stop=stop, steps=steps, b=b)
            return jax.lax.psum(acc, AXIS)

        return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(), P(), P()), out_specs=P(),
                             check_vma=False)(weights, x, sigma, keys, offset)

    def counts(x, sigma, keys, num: int, offset=0):
        return counts_with(weights, x, sigma, keys, num=num, offset=offset)

    counts.jitted, counts.weights, counts.mesh = counts_with, weights, mesh
    return counts


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


CHUNK_STEPS = 8  # device steps per counter call when progress is reported (a few seconds of work)


class Counter:
    """Counts of ``num`` draws for any number of images, over the compiled counters of one ``f``.

    ``counts(x (M,H,W,C), sigma (M,), keys (M,), num) -> int64 (M, K + 1)`` (column K: non-finite
    draws). The images are cut into groups of M' (:func:`choose_layout`: M' images with b draws
    each fill one forward batch of about ``batch_size``); the last group is padded to M' with
    copies of its first image, whose counts are dropped, so no new shape is compiled; one compiled
    counter is kept per b. Groups are cut on the host (numpy) so that no eager device op runs on a
    new shape. ``candidates`` counts C noisy-copy variants of each image through the same path.
    Draws depend only on each image's key and the draw index, so neither the grouping nor
    ``batch_size`` nor the devices change any count.
    """

    def __init__(self, f, num_classes: int, batch_size: int, *, devices=None):
        self.f = f
        self.num_classes = int(num_classes)
        self.batch_size = int(batch_size)
        self.devices = devices
        self._counters = {}
        self.calls = 0  # candidate evaluations made (one sequential round of a search each)
        self.draws = 0  # noisy forward passes per image in candidate evaluations (sum of C * num)

    def layout(self, num_images: int, num: int):
        """(images per group, draws per image per step) for ``num`` draws."""
        return choose_layout(num_images, num, self.batch_size)

    def counter(self, b: int):
        """The compiled counter with ``b`` draws per image per step (cached)."""
        if b not in self._counters:
            self._counters[b] = make_counter(self.f, self.num_classes, samples_per_step=b, devices=self.devices)
        return self._counters[b]

    def counts(self, x, sigma, keys, num: int, group: int | None = None, progress=None):
        """int64 (M, K + 1) counts of ``num`` draws for each image of ``x``.

        ``group``: images per device step (default: as many as :func:`choose_layout` allows for
        this ``num``; pass the same value across calls to reuse one compilation). ``progress(k)``
        is called on the host after every ``k`` noisy forward passes; with it, a long count is
        split by draw offset into calls of ``CHUNK_STEPS`` device steps (the same draws).
        """
        x = np.asarray(x, np.float32)
        m_total = x.shape[0]
        m, b = self.layout(m_total if group is None else group, num)
        counter = self.counter(b)
        sigma = np.broadcast_to(np.asarray(sigma, np.float32), (m_total,))
        key_data = np.asarray(jax.random.key_data(keys))
        impl = jax.random.key_impl(keys)
        chunk = num if progress is None else min(num, CHUNK_STEPS * b)
        out = []
        for start in range(0, m_total, m):
            sel = np.arange(start, min(start + m, m_total))
            pad = m - len(sel)
            if pad:
                sel = np.concatenate([sel, np.full(pad, start)])
            kg = jax.random.wrap_key_data(key_data[sel], impl=impl)
            acc = np.zeros((m, self.num_classes + 1), np.int64)
            for offset in range(0, num, chunk):
                k = min(chunk, num - offset)
                acc += np.asarray(counter(x[sel], sigma[sel], kg, num=k, offset=offset))
                if progress is not None:
                    progress((m - pad) * k)
            out.append(acc[: m - pad])
        if not out:
            return np.zeros((0, self.num_classes + 1), np.int64)
        return np.concatenate(out)

    def candidates(self, x, sigmas, keys, num: int):
        """int64 (M, C, K + 1) counts of ``num`` draws of each copy x_i + sigmas[i, c] * eps_ij.

        ``keys`` (M,): all copies of image i draw eps_ij from keys[i] (common random numbers: the
        C candidates see the same noise, only its scale differs, so their comparison is paired);
        keys (M, C): each copy its own draws. The M * C copies go through :meth:`counts`.
        """
        x = np.asarray(x, np.float32)
        sigmas = np.asarray(sigmas, np.float32)
        m, c = sigmas.shape
        if x.shape[0] != m:
            raise ValueError(f"x has {x.shape[0]} images but sigmas has {m} rows")
        kr = keys.reshape(-1) if keys.ndim == 2 else jnp.repeat(keys, c, axis=0)
        counts = self.counts(np.repeat(x, c, axis=0), sigmas.reshape(-1), kr, int(num))
        self.calls += 1
        self.draws += c * int(num)
        return counts.reshape(m, c, self.num_classes + 1)
