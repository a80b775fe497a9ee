"""DDRS: Data-Dependent Randomized Smoothing (Alfarra, Bibi, Torr, Ghanem; UAI 2022);
reference code MotasemAlfarra/Data_Dependent_Randomized_Smoothing.

Per input x, sigma_x is found by plain gradient ascent on the differentiable radius surrogate

    psi(sigma) = (1/n) sum_{j=1..n} softmax(f(x + sigma * eps_j)),  eps_j ~ N(0, I)  (reparameterised)
    R(sigma)   = sigma/2 * (Phi^{-1}(clip(psi_(1))) - Phi^{-1}(clip(psi_(2)))),   clip to [lo, hi]
    sigma     <- sigma + lr * dR/dsigma                                             (K times)

where psi_(1), psi_(2) are the two largest entries of psi, with fresh eps each iteration and
the network frozen. dR/dsigma comes from ``jax.grad`` (through sigma * eps_j and the network);
the batch of images is handled at once (R_i depends only on sigma_i, so the gradient of
sum_i R_i is the vector of per-image gradients), and all K iterations run inside ONE jitted
``lax.fori_loop``. The clip has zero gradient outside [lo, hi], as ``torch.clamp`` in the
reference; once both entries are clipped the gradient is the constant gap/2.

Defaults (the paper's and the reference's): sigma0 = the model's training sigma (meta['sigma']; else the certify
command's SIGMA), lr = 1e-4, K = 100, n = 1, clip [0.02, 0.98]. No projection or positivity
constraint during the ascent (as the reference); the returned sigma is floored at 1e-4 (this library's choice) so
that CERTIFY gets a positive noise level.

Noise: iteration k uses draws k*n, ..., k*n + n - 1 of the image's ``optimize`` stream; the
certificate then runs Cohen CERTIFY at sigma_x with the fresh ``select``/``estimate`` streams.

Memory (``--ddrs-memory``): the certify command feeds every certified image, in
dataset order, through :class:`rsjax.methods.memory.Memory`, which shrinks or relabels a
certificate whose ball would overlap a stored ball of another class (guarantee ``memory``).

Options (:class:`DDRSConfig`): --ddrs-sigma0, --ddrs-lr, --ddrs-steps, --ddrs-n, --ddrs-clamp LO,HI,
--ddrs-memory.
Output extras: sigma0 (the start of the ascent).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from rsjax.config import option
from rsjax.errors import RsjaxError, check_count, check_positive
from rsjax.methods import Method, register
from rsjax.methods._common import memory_factory, method_keys, parse_float_list, training_sigma, unpack

SIGMA_FLOOR = 1e-4


@dataclasses.dataclass(frozen=True)
class DDRSConfig:
    """DDRS's options (flags and recorded settings come from these fields)."""

    ddrs_sigma0: Optional[float] = option(None, "start of the ascent (default: the model's training sigma, else SIGMA)")
    ddrs_lr: float = option(1e-4, "gradient-ascent step on sigma")
    ddrs_steps: int = option(100, "ascent iterations K")
    ddrs_n: int = option(1, "noise draws per iteration")
    ddrs_clamp: str = option("0.02,0.98", "LO,HI clip of psi before Phi^-1", metavar="LO,HI")
    ddrs_memory: bool = option(False, "memory-based certification: shrink/relabel overlapping "
                                      "certificates")

    def __post_init__(self):
        self.ascent()

    def ascent(self) -> "Ascent":
        """The ascent settings (:class:`Ascent`), validated."""
        clamp = parse_float_list(self.ddrs_clamp, "--ddrs-clamp")
        if len(clamp) != 2:
            raise RsjaxError(f"--ddrs-clamp must be two numbers LO,HI, got {self.ddrs_clamp!r}")
        return Ascent(sigma0=self.ddrs_sigma0, lr=self.ddrs_lr, steps=self.ddrs_steps, n=self.ddrs_n,
                      clamp=clamp).validate()


@dataclasses.dataclass(frozen=True)
class Ascent:
    """The gradient-ascent settings the optimiser runs with."""

    sigma0: float | None = None  # None: meta['sigma'], else the certify command's SIGMA
    lr: float = 1e-4
    steps: int = 100
    n: int = 1
    clamp: tuple = (0.02, 0.98)

    def validate(self):
        if self.sigma0 is not None:
            check_positive("--ddrs-sigma0", self.sigma0)
            if not np.isfinite(self.sigma0):
                raise RsjaxError(f"--ddrs-sigma0 must be finite, got {self.sigma0}")
        check_positive("--ddrs-lr", self.lr)
        check_count("--ddrs-steps", self.steps, minimum=0)
        check_count("--ddrs-n", self.n)
        lo, hi = self.clamp
        if not (0.0 < lo < hi < 1.0):
            raise RsjaxError(f"--ddrs-clamp must be LO,HI with 0 < LO < HI < 1, got {lo},{hi}")
        return self


def surrogate_radius(f, x, sigma, eps, clamp):
    """R_i(sigma_i) for each image: x (M,H,W,C), sigma (M,), eps (M, n, H, W, C) -> (M,)."""
    import jax
    import jax.numpy as jnp
    from jax.scipy.special import ndtri

    m, n = eps.shape[:2]
    xn = x[:, None] + sigma[:, None, None, None, None].astype(x.dtype) * eps
    logits = f(xn.reshape((m * n,) + x.shape[1:]))
    psi = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(m, n, -1).mean(axis=1)
    top2 = jax.lax.top_k(psi, 2)[0]
    p = jnp.clip(top2, clamp[0], clamp[1])
    return sigma / 2.0 * (ndtri(p[:, 0]) - ndtri(p[:, 1]))


def make_optimizer(f, cfg: Ascent):
    """Jitted ``optimize(x, sigma0, keys) -> sigma`` running the K ascent steps on the device."""
    import jax
    import jax.numpy as jnp

    from rsjax.core.sampler import sample_noise

    cfg = cfg.validate()
    n, steps, lr, clamp = int(cfg.n), int(cfg.steps), float(cfg.lr), tuple(map(float, cfg.clamp))

    def noise(keys, k, shape):
        idx = k * n + jnp.arange(n, dtype=jnp.uint32)
        return jax.vmap(sample_noise, in_axes=(0, None, None))(keys, idx, shape)

    @jax.jit
    def optimize(x, sigma0, keys):
        x = jnp.asarray(x, jnp.float32)

        def total(sigma, eps):
            return surrogate_radius(f, x, sigma, eps, clamp).sum()

        def body(k, sigma):
            eps = noise(keys, jnp.asarray(k, jnp.uint32), x.shape[1:])
            return sigma + lr * jax.grad(total)(sigma, eps)

        sigma = jax.lax.fori_loop(0, steps, body, jnp.asarray(sigma0, jnp.float32))
        return jnp.maximum(sigma, SIGMA_FLOOR)

    optimize.noise = noise
    return optimize


# --- the method ----------------------------------------------------------------------------------
def build(cfg: DDRSConfig, classifier, *, seed, batch_size=None, n=None):
    """chooser(x, idx, sigma0) -> (sigma_x, {'sigma0': start}). The ascent runs on the whole batch
    of images at once (``batch_size`` and ``n``, the certificate's N, are not used)."""
    f, meta, _ = unpack(classifier)
    ascent = cfg.ascent()
    optimize = make_optimizer(f, ascent)
    start = ascent.sigma0 if ascent.sigma0 is not None else training_sigma(meta)

    import jax.numpy as jnp

    def chooser(x, idx, sigma0):
        m = np.asarray(x).shape[0]
        s0 = np.full(m, start, np.float32) if start is not None else np.broadcast_to(
            np.asarray(sigma0, np.float32), (m,))
        sigma = np.asarray(optimize(jnp.asarray(x, jnp.float32), jnp.asarray(s0), method_keys(seed, idx, "optimize")))
        return sigma.astype(np.float64), {"sigma0": s0.astype(np.float64)}

    return chooser


METHOD = register(Method(
    name="ddrs",
    guarantee="per-input",
    config=DDRSConfig,
    build=build,
    memory=memory_factory("ddrs_memory"),
    extra_columns=("sigma0",),
))
