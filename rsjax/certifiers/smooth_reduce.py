"""Smooth-Reduce (Joshi et al. 2022, arXiv 2205.06154; NYU-DICE-Lab/SmoothReduce
``smoothadv/patch_model.py``): randomized smoothing of a patch ensemble.

An image x (h, w, C) in [0, 1] is resized to z = U x (``resize`` x ``resize``; bilinear or
nearest, :mod:`rsjax.certifiers.patches`) and cut into P patches q_k = A_k z of p x p (the
dense grid in row-major ``unfold`` order truncated to the first P, or P random corners drawn
once per image). One Monte Carlo draw gives one vote:

- ``independent`` (``PatchSmooth``, every published run): q_k + sigma eps_k with independent
  eps_k ~ N(0, I) per patch; vote = argmax_c red_k softmax(f(q_k + sigma eps_k))_c;
- ``shared`` (``PatchModel`` under the plain ``Smooth``): one field eps ~ N(0, I) on z, patches
  cut from z + sigma eps; vote = argmax_c red_k f(A_k (z + sigma eps))_c (raw logits);

with red one of mean, max, min over the patch axis (min with ``independent`` is an extension:
the reference's ``PatchSmooth`` only reduces by mean or max). CERTIFY is Cohen's: c_A from n0
``select`` draws, n_A from n ``estimate`` draws, pA_lower = Beta^-1(alpha; n_A, n - n_A + 1),
abstain if pA_lower < 1/2.

Two radii. ``radius_raw`` = sigma Phi^-1(pA_lower), the reference's number. It is a certificate in
the space where the noise is isotropic: the resized image z (``shared``) or the stacked patches
u = A z (``independent``). A perturbation delta of the image moves them by U delta and A U delta,
so the image-space L2 certificate is

    radius = radius_raw / ||Pi U||   (shared;  Pi: projection on the pixels some patch covers)
    radius = radius_raw / ||A U||    (independent; ||A U||^2 = lambda_max(U^T diag(c) U))

with c the patch coverage of z; both are at most ||U|| and sqrt(c_max) ||U|| (the spec's bound,
section 7.3), and are computed exactly (:func:`rsjax.certifiers.patches.weighted_norm`).

All draws run on the device: one jitted ``lax.scan`` evaluates the base classifier on
``M * b * P`` patches per step (the patch axis folded into the batch) and returns only the
(M, K) counts; over several local devices each runs its share of the steps and the counts are
summed (``shard_map`` over the sampler's 1-D mesh), the same counts as one device. The noise of draw j of image i is ``normal(fold_in(key_i, j))`` of shape
(P, p, p, C) (independent) or (H, W, C) (shared), with key_i from
``rsjax.core.sampler.image_keys(seed, idx_i, "select" | "estimate")``; random corners come from
the ``patches`` stream. So results depend on (seed, idx) only, never on the batch size.
A draw whose logits are not all finite gives no vote (it still counts in n) and is counted in
``nonfinite``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rsjax.certifiers import patches as geo
from rsjax.config import check, option
from rsjax.core import stats
from rsjax.core.sampler import AXIS, device_mesh, image_keys, sample_noise, split_weights
from rsjax.errors import RsjaxError, check_alpha, check_count

AGGREGATES = ("mean", "max", "min")
NOISES = ("independent", "shared")
RESIZE_MODES = ("bilinear", "nearest")
# Forward inputs per device call: progress is reported after each call, so a call should take
# seconds at most on a CPU and stay long enough on an accelerator to hide the dispatch.
CALL_INPUTS = 4096

GUARANTEE = "radius: image-space L2 certificate; radius_raw: the reference's sigma*Phi^-1(pA_lower)"
RAW_SPACE = {"shared": "resized-image", "independent": "stacked-patches"}


@dataclasses.dataclass(frozen=True)
class SmoothReduceConfig:
    """Smooth-Reduce settings (the flags of ``rsjax certify --certifier smooth-reduce``)."""

    resize: Optional[int] = option(36, "side of the square image the input is resized to before the "
                                       "patches are cut (none: keep the input size)")
    patch_size: int = option(32, "side p of the square patches (the base classifier's input)")
    patch_stride: int = option(1, "stride of the dense patch grid")
    num_patches: int = option(25, "P: the first P patches of the grid (row-major), or P random patches")
    aggregate: str = option("mean", "reduction over the patches", choices=AGGREGATES)
    noise: str = option("independent", "independent noise per patch (PatchSmooth) or one noise field "
                                        "on the resized image (PatchModel)", choices=NOISES)
    random_patches: bool = option(False, "P random patch corners per image instead of the dense grid")
    resize_mode: str = option("bilinear", "interpolation of the resize (torchvision Resize on tensors)",
                              choices=RESIZE_MODES)

    def __post_init__(self):
        check(self.aggregate in AGGREGATES,
              f"--aggregate must be one of {', '.join(AGGREGATES)}, got {self.aggregate!r}")
        check(self.noise in NOISES, f"--noise must be one of {', '.join(NOISES)}, got {self.noise!r}")
        check(self.resize_mode in RESIZE_MODES,
              f"--resize-mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        check(_is_int(self.patch_size) and self.patch_size >= 1,
              f"--patch-size must be an integer >= 1, got {self.patch_size}")
        check(_is_int(self.patch_stride) and self.patch_stride >= 1,
              f"--patch-stride must be an integer >= 1, got {self.patch_stride}")
        check(_is_int(self.num_patches) and self.num_patches >= 1,
              f"--num-patches must be an integer >= 1, got {self.num_patches}")
        if self.resize is not None:
            check(_is_int(self.resize) and self.resize >= 1, f"--resize must be an integer >= 1, got {self.resize}")
            check(self.patch_size <= self.resize,
                  f"--patch-size {self.patch_size} is larger than the resized image (--resize {self.resize})")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The resize and patch maps for one input shape: U = R_h (x) R_w, the grid corners (None with
    random patches), the number of patches P and the patch side p."""

    in_shape: tuple  # (h, w, C)
    size: tuple  # (H, W) of z
    rh: np.ndarray
    rw: np.ndarray
    corners: Optional[np.ndarray]
    num_patches: int
    patch: int

    @property
    def patch_shape(self):
        return (self.patch, self.patch, self.in_shape[2])


def geometry(cfg: SmoothReduceConfig, in_shape) -> Geometry:
    """The maps of ``cfg`` for images of ``in_shape`` (h, w, C); RsjaxError if the patch does not fit."""
    h, w, _ = (int(s) for s in in_shape)
    size = (h, w) if cfg.resize is None else (cfg.resize, cfg.resize)
    p = cfg.patch_size
    if p > min(size):
        raise RsjaxError(f"--patch-size {p} is larger than the {'input' if cfg.resize is None else 'resized'} "
                         f"image ({size[0]}x{size[1]})")
    rh, rw = geo.resize_matrices((h, w), size, cfg.resize_mode)
    if cfg.random_patches:
        corners, num = None, cfg.num_patches
    else:
        corners = geo.grid_corners(size[0], size[1], p, cfg.patch_stride, cfg.num_patches)
        num = len(corners)  # the reference keeps all the grid has when it has fewer than P
    return Geometry(tuple(int(s) for s in in_shape), size, rh, rw, corners, num, p)


def image_norm(geom: Geometry, noise: str, corners) -> tuple:
    """(||A U|| or ||Pi U||, c_max) for one image's patch corners: the factor between the raw and
    the image-space radius (module docstring)."""
    c = geo.coverage(corners, geom.size[0], geom.size[1], geom.patch)
    weights = c if noise == "independent" else (c > 0).astype(np.int64)
    return geo.weighted_norm(geom.rh, geom.rw, weights), int(c.max())


def _extract(img, corners, p):
    """(P, p, p, C) patches of img (H, W, C): static slices for a fixed grid (numpy corners),
    dynamic slices for traced per-image corners."""
    if isinstance(corners, np.ndarray):
        return jnp.stack([img[r:r + p, s:s + p] for r, s in corners])
    size = (p, p, img.shape[-1])
    return jax.vmap(lambda rc: jax.lax.dynamic_slice(img, (rc[0], rc[1], 0), size))(corners)


def _reduce(scores, aggregate):
    """red_k over the patch axis (-2) of (..., P, K)."""
    return {"mean": jnp.mean, "max": jnp.max, "min": jnp.min}[aggregate](scores, axis=-2)


def draw_votes(logits, noise: str, aggregates):
    """Votes of draws from their patch logits (..., P, K): for each aggregate, argmax_c of red_k
    softmax (independent) or of red_k logits (shared); and whether each draw's logits are finite.
    Returns (int32 (A, ...), bool (...))."""
    finite = jnp.all(jnp.isfinite(logits), axis=(-2, -1))
    scores = jax.nn.softmax(logits, axis=-1) if noise == "independent" else logits
    votes = jnp.stack([jnp.argmax(_reduce(scores, a), axis=-1) for a in aggregates])
    return votes, finite


def make_patch_counter(apply, num_classes: int, geom: Geometry, noise: str, aggregates, *, b: int, steps: int,
                       mesh=None):
    """Jitted ``counts(weights, x, corners, sigma, keys, offset, stop) -> (int32 (A, m, K), int32 (m,))``.

    For each of the m images (x (m, h, w, C) clean, sigma (m,), keys (m,)) it runs ``steps`` device
    steps of ``b`` draws; draw l (0 <= l < steps*b) has global index ``offset + l`` and counts only
    if ``l < stop``. Per step the base classifier sees ``m * b * P`` patches in one batch. Returns
    the vote counts per aggregate and the number of counted draws with non-finite logits.
    ``corners``: int (m, P, 2) per-image corners, ignored when ``geom.corners`` is a fixed grid.
    ``mesh``: a 1-D device mesh (:func:`rsjax.core.sampler.device_mesh`, default: the local
    devices); device d runs steps d*S' .. (d+1)*S' - 1 (S' = ceil(steps / devices), steps past
    ``steps`` are masked) and the counts are summed, so they equal one device's.
    """
    p, P, (H, W) = geom.patch, geom.num_patches, geom.size
    pshape = geom.patch_shape
    rh, rw = jnp.asarray(geom.rh, jnp.float32), jnp.asarray(geom.rw, jnp.float32)
    fixed = geom.corners

    mesh = device_mesh() if mesh is None else mesh
    steps_d = -(-steps // mesh.devices.size)

    @jax.jit
    def counts(weights, x, corners, sigma, keys, offset, stop):
        return jax.shard_map(per_device, mesh=mesh, in_specs=(PartitionSpec(),) * 7,
                             out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False)(
            weights, x, corners, sigma, keys, jnp.asarray(offset, jnp.uint32), jnp.asarray(stop, jnp.uint32))

    def per_device(weights, x, corners, sigma, keys, offset, stop):
        m = x.shape[0]
        first = jax.lax.axis_index(AXIS).astype(jnp.uint32) * steps_d
        z = geo.resize(x, rh, rw)  # (m, H, W, C)
        cut = (lambda img, c: _extract(img, fixed, p)) if fixed is not None else (lambda img, c: _extract(img, c, p))
        clean = jax.vmap(cut)(z, corners) if noise == "independent" else None  # (m, P, p, p, C)
        sig = sigma.astype(jnp.float32)

        def step(carry, s):
            acc, bad = carry
            local = (first + s) * b + jnp.arange(b, dtype=jnp.uint32)
            j = offset + local
            if noise == "independent":
                eps = jax.vmap(sample_noise, in_axes=(0, None, None))(keys, j, (P,) + pshape)  # (m, b, P, ...)
                inp = clean[:, None] + sig[:, None, None, None, None, None] * eps
            else:
                eps = jax.vmap(sample_noise, in_axes=(0, None, None))(keys, j, z.shape[1:])  # (m, b, H, W, C)
                zn = z[:, None] + sig[:, None, None, None, None] * eps
                inp = jax.vmap(lambda zi, ci: jax.vmap(lambda zz: cut(zz, ci))(zi))(zn, corners)
            logits = apply(weights, inp.reshape((m * b * P,) + pshape)).reshape(m, b, P, num_classes)
            votes, finite = draw_votes(logits, noise, aggregates)
            valid = (local < stop)[None, :]
            hits = jax.nn.one_hot(votes, num_classes, dtype=jnp.int32) * (valid & finite)[None, :, :, None]
            return (acc + hits.sum(axis=2), bad + jnp.sum(valid & ~finite, axis=1, dtype=jnp.int32)), None

        acc0 = (jnp.zeros((len(aggregates), m, num_classes), jnp.int32), jnp.zeros((m,), jnp.int32))
        (acc, bad), _ = jax.lax.scan(step, acc0, jnp.arange(steps_d, dtype=jnp.uint32))
        return jax.lax.psum(acc, AXIS), jax.lax.psum(bad, AXIS)

    return counts


def layout(num_images: int, num: int, batch_size: int, num_patches: int):
    """(m images per group, b draws per image per step, steps per call, calls) for ``num`` draws with
    about ``batch_size`` patch forwards per step: b = ceil(num / ceil(num / b_max)) with
    b_max = batch_size // P (draws spread evenly over the steps), m = b_max // b images in flight,
    and the steps cut into equal calls of about CALL_INPUTS forwards (progress after each)."""
    b_max = max(1, batch_size // num_patches)
    total = -(-num // b_max)
    b = -(-num // total)
    m = max(1, min(num_images, b_max // b))
    per_call = max(1, max(CALL_INPUTS, 4 * batch_size) // (m * b * num_patches))
    calls = -(-total // per_call)
    return m, b, -(-total // calls), calls


class SmoothReduceRunner:
    """CERTIFY of the Smooth-Reduce smoothed classifier for any number of images, counters
    compiled once per layout. ``key``: integer seed or JAX PRNG key (as :func:`rsjax.certify`)."""

    def __init__(self, cfg: SmoothReduceConfig, f, num_classes: int, input_shape, *, key=0, batch_size=1000,
                 devices=None):
        self.cfg = cfg
        self.mesh = device_mesh(devices)
        self.geom = geometry(cfg, input_shape)
        self.num_classes = int(num_classes)
        self.key = key
        self.batch_size = check_count("batch_size", batch_size)
        self.apply, self.weights = split_weights(f)
        if self.weights is not None:  # replicated once on the mesh
            self.weights = jax.device_put(self.weights, NamedSharding(self.mesh, PartitionSpec()))
        self._counters = {}
        self._norms = {}
        try:
            out = jax.eval_shape(functools.partial(self.apply, self.weights),
                                 jax.ShapeDtypeStruct((1,) + self.geom.patch_shape, jnp.float32))
        except Exception as e:  # noqa: BLE001 - one line for any shape error of the base classifier
            raise RsjaxError(f"the classifier does not accept {self.geom.patch} x {self.geom.patch} patches "
                             f"({type(e).__name__})") from None
        if out.shape[-1] != self.num_classes:
            raise RsjaxError(f"the classifier gives {out.shape[-1]} logits per patch, expected {self.num_classes}")

    @property
    def info(self) -> dict:
        """Settings recorded with the results: the config plus the effective number of patches."""
        from rsjax.config import to_dict

        return dict(to_dict(self.cfg), effective_num_patches=self.geom.num_patches,
                    resized=list(self.geom.size))

    def corners(self, idx):
        """int (M, P, 2) patch corners of the images ``idx`` (the grid repeated, or random per image)."""
        from rsjax.core.certify import keys_for

        g = self.geom
        if g.corners is not None:
            return np.broadcast_to(g.corners, (len(idx),) + g.corners.shape).astype(np.int32)
        keys = keys_for(self.key, np.asarray(idx), "patches")
        draw = jax.vmap(lambda k: geo.random_corners(k, g.size[0], g.size[1], g.patch, g.num_patches))
        return np.asarray(draw(keys))

    def norms(self, corners):
        """(op_norm float64 (M,), c_max int (M,)) per image (cached per distinct corner set)."""
        out = []
        for c in corners:
            k = c.tobytes()
            if k not in self._norms:
                self._norms[k] = image_norm(self.geom, self.cfg.noise, c)
            out.append(self._norms[k])
        return np.array([o[0] for o in out], np.float64), np.array([o[1] for o in out], np.int64)

    def _counter(self, aggregates, m, b, steps):
        k = (aggregates, m, b, steps)
        if k not in self._counters:
            self._counters[k] = make_patch_counter(self.apply, self.num_classes, self.geom, self.cfg.noise,
                                                   aggregates, b=b, steps=steps, mesh=self.mesh)
        return self._counters[k]

    def counts(self, x, corners, sigma, keys, num: int, aggregates, progress=None):
        """(int64 (A, M, K) vote counts per aggregate, int64 (M,) non-finite draws) of ``num`` draws."""
        x = np.asarray(x, np.float32)
        m_total = x.shape[0]
        m, b, steps, calls = layout(m_total, num, self.batch_size, self.geom.num_patches)
        counter = self._counter(tuple(aggregates), m, b, steps)
        key_data = np.asarray(jax.random.key_data(keys))
        impl = jax.random.key_impl(keys)
        sigma = np.asarray(sigma, np.float32)
        out_c, out_bad = [], []
        for start in range(0, m_total, m):
            sel = np.arange(start, min(start + m, m_total))
            real = len(sel)
            sel = np.concatenate([sel, np.full(m - real, start)]) if real < m else sel
            kg = jax.random.wrap_key_data(key_data[sel], impl=impl)
            acc = np.zeros((len(aggregates), m, self.num_classes), np.int64)
            bad = np.zeros((m,), np.int64)
            for call in range(calls):
                offset = call * steps * b
                stop = min(num - offset, steps * b)
                c, nb = counter(self.weights, x[sel], corners[sel], sigma[sel], kg, offset, stop)
                acc += np.asarray(c)
                bad += np.asarray(nb)
                if progress is not None:
                    progress(stop * real)
            out_c.append(acc[:, :real])
            out_bad.append(bad[:real])
        if not out_c:
            return np.zeros((len(aggregates), 0, self.num_classes), np.int64), np.zeros((0,), np.int64)
        return np.concatenate(out_c, axis=1), np.concatenate(out_bad)

    def certify_aggregates(self, x, idx, sigma, *, n0, n, alpha, aggregates, progress=None) -> dict:
        """{aggregate: result dict} from the same draws: the aggregates share every forward pass
        (their votes are different reductions of the same patch logits), so each result equals
        a separate run with that aggregate."""
        from rsjax.core.certify import _check_inputs, keys_for

        x, sigma, idx = _check_inputs(x, sigma, idx)
        if x.shape[1:] != self.geom.in_shape:
            raise RsjaxError(f"images have shape {x.shape[1:]}, this certifier was built for {self.geom.in_shape}")
        n0, n = check_count("n0", n0), check_count("n", n)
        check_alpha(alpha)
        aggregates = tuple(aggregates)
        for a in aggregates:
            check(a in AGGREGATES, f"--aggregate must be one of {', '.join(AGGREGATES)}, got {a!r}")
        corners = self.corners(idx)
        norm, cmax = self.norms(corners)
        c0, bad0 = self.counts(x, corners, sigma, keys_for(self.key, idx, "select"), n0, aggregates, progress)
        c1, bad1 = self.counts(x, corners, sigma, keys_for(self.key, idx, "estimate"), n, aggregates, progress)
        out = {}
        for i, a in enumerate(aggregates):
            # non-finite draws enter as an extra class that never wins the selection (zero count,
            # last index) but stays in n: they count as draws that did not vote c_A
            predict, raw, pA_lower = stats.certify_from_counts(np.concatenate([c0[i], 0 * bad0[:, None]], axis=1),
                                                               np.concatenate([c1[i], bad1[:, None]], axis=1),
                                                               sigma, alpha)
            out[a] = {
                "predict": predict,
                "radius": raw / norm,
                "pA_lower": pA_lower,
                "nonfinite": bad0 + bad1,
                "radius_raw": raw,
                "guarantee": np.full(len(idx), f"image-l2 (raw: {RAW_SPACE[self.cfg.noise]}-l2)", dtype=object),
                "op_norm": norm,
                "c_max": cmax,
            }
        return out

    def certify(self, x, idx, sigma, *, n0, n, alpha, progress=None) -> dict:
        """CERTIFY of each image: dict of numpy arrays (M,) ``predict`` (-1 = abstain), ``radius``
        (image-space L2), ``pA_lower``, ``nonfinite`` (draws with non-finite logits, no vote),
        ``radius_raw`` (sigma Phi^-1(pA_lower), the reference's), ``guarantee``, ``op_norm`` (the
        divisor between the two radii) and ``c_max`` (largest patch coverage of a pixel).
        ``progress(k)`` is called after each device call with the k Monte Carlo draws it finished
        (each draw is P patch forwards)."""
        return self.certify_aggregates(x, idx, sigma, n0=n0, n=n, alpha=alpha, aggregates=(self.cfg.aggregate,),
                                       progress=progress)[self.cfg.aggregate]


def build(cfg: SmoothReduceConfig, classifier, *, seed, batch_size) -> SmoothReduceRunner:
    """The runner of ``cfg`` for ``classifier = (f, meta)`` (meta: num_classes, input_shape [h, w, C])."""
    f, meta = classifier
    return SmoothReduceRunner(cfg, f, int(meta["num_classes"]), tuple(meta["input_shape"]), key=seed,
                              batch_size=batch_size)


def smooth_reduce_certify(f, x, *, sigma, n0=100, n=100_000, alpha=0.001, key=0, idx=None, batch_size=1000,
                          config=None, num_classes=None) -> dict:
    """Smooth-Reduce CERTIFY at each image of x (M, h, w, C) in [0, 1]; arguments as
    :func:`rsjax.certify` plus ``config`` (:class:`SmoothReduceConfig`, default the reference's
    CIFAR setting 36 -> 32, 25 patches, mean, independent noise). Returns the dict of
    :meth:`SmoothReduceRunner.certify`."""
    cfg = SmoothReduceConfig() if config is None else config
    if not isinstance(cfg, SmoothReduceConfig):
        raise RsjaxError(f"config must be a SmoothReduceConfig, got {type(cfg).__name__}")
    x = np.asarray(x, np.float32)
    if x.ndim != 4:
        raise RsjaxError(f"x must be a batch of images (M, H, W, C), got shape {tuple(x.shape)}")
    geom = geometry(cfg, x.shape[1:])
    if num_classes is None:
        num_classes = jax.eval_shape(f, jax.ShapeDtypeStruct((1,) + geom.patch_shape, jnp.float32)).shape[-1]
    runner = SmoothReduceRunner(cfg, f, num_classes, x.shape[1:], key=key, batch_size=batch_size)
    idx = np.arange(len(x)) if idx is None else idx
    return runner.certify(x, idx, sigma, n0=n0, n=n, alpha=alpha)


CERTIFIER = dict(
    name="smooth-reduce",
    guarantee=GUARANTEE,
    config=SmoothReduceConfig,
    build=build,
    # the runner's per-row ``guarantee`` fills the CLI's guarantee column
    columns=("radius_raw", "op_norm", "c_max"),
)


def _register():
    from rsjax.certifiers import Certifier, register

    return register(Certifier(**CERTIFIER))


SMOOTH_REDUCE = _register()

__all__ = ["SmoothReduceConfig", "SmoothReduceRunner", "build", "smooth_reduce_certify", "CERTIFIER", "geometry",
           "image_norm", "draw_votes", "make_patch_counter"]
