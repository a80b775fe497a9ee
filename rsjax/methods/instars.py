"""Insta-RS (Chen, Kong, Yu, Luque, Goldstein, Huang; arXiv 2103.04436): multi-start search for a
per-input sigma, after the paper's description (no public code exists; every rule and
constant below is this library's choice and is settable on the command line).

Estimated radius (as QCRS's FAST_CERTIFY): from ``num`` draws at sigma,
R_hat(sigma) = sigma * Phi^{-1}(pL), pL the one-sided Clopper-Pearson lower bound at
alpha_s = --instars-alpha (0.001) of the count of c_A; 0 when the draws' argmax is not c_A or
pL < 1/2.

Per image x with start level sigma0 (the certify command's SIGMA):

1. Bounds [sigma_min, sigma_max] = [--instars-min, --instars-max] (default [sigma0/4, 4 sigma0]).
2. Starts S = ({sigma0 * 2^k : k in --instars-exponents (default -1,0,1)} union the training
   sigmas (--instars-train-sigmas, default the model's meta['sigma'])) intersected with
   [sigma_min, sigma_max], sorted, duplicates removed.
3. c_A = argmax of --instars-n0 (100) draws at sigma0.
4. Evaluate R_hat at every start with n = --instars-n (256) draws.
5. Local multiplicative search, T = --instars-steps (4) steps, from every start at once: each
   start s holds (sigma_s, eta_s), eta_s = --instars-eta (0.25) initially; a step evaluates
   sigma_s * (1 - eta_s), sigma_s, sigma_s * (1 + eta_s) (clipped to the bounds) with n fresh
   draws common to the three (paired comparison); sigma_s moves to the best of the three
   (ties: stay, then the smaller sigma); if it stays, eta_s halves (refinement). R_hat_s is the
   latest estimate at sigma_s.
6. sigma_x = sigma_s of the start with the largest R_hat_s (ties: the smaller start).
7. Cohen CERTIFY at sigma_x with fresh ``select``/``estimate`` draws (the certify command).

Parallelism: step 4 is one sampler call (images x starts), every step of 5 one sampler call
(images x starts x 3 candidates); the sequence has 2 + T device calls per batch of images.
Draws per image: n0 + |S| n + 3 T |S| n (defaults, |S| = 3: 100 + 768 + 9216 = 10,084).

Noise: all the search's draws come from the ``search`` stream (sub-stream 0: c_A, 1: step 4,
t + 1: step t of 5), never from the certificate's streams (sample splitting).
Output extras: sigma_start (the start that won) and search_radius (its R_hat).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from rsjax.config import option
from rsjax.core.batching import DEFAULT_BATCH_SIZE
from rsjax.errors import RsjaxError, check_count, check_positive
from rsjax.methods import Method, register
from rsjax.methods._common import (
    candidate_counter,
    class_counts,
    estimated_radius,
    memory_factory,
    method_keys,
    parse_float_list,
    round_keys,
    training_sigma,
    unpack,
)

BOUND_SLACK = 1e-12  # a start sigma0 * 2^k on a bound by float rounding still counts as inside


@dataclasses.dataclass(frozen=True)
class InstaRSConfig:
    """Insta-RS's options (flags and recorded settings come from these fields; module doc)."""

    instars_exponents: str = option("-1,0,1", "starts sigma0 * 2^k for these k (write --instars-exponents=-2,-1,0)")
    instars_train_sigmas: Optional[str] = option(None, "extra starts: comma list of training sigmas "
                                                       "(default: the model's training sigma)")
    instars_min: Optional[float] = option(None, "lowest sigma searched (default SIGMA/4)")
    instars_max: Optional[float] = option(None, "highest sigma searched (default 4*SIGMA)")
    instars_n: int = option(256, "draws per evaluation of R_hat")
    instars_n0: int = option(100, "draws at SIGMA that fix the class c_A")
    instars_steps: int = option(4, "local-search steps T per start")
    instars_eta: float = option(0.25, "initial multiplicative step")
    instars_alpha: float = option(0.001, "Clopper-Pearson alpha inside the search")
    instars_memory: bool = option(False, "memory-based consistency check (DDRS memory-based certification) over the certified balls")

    def __post_init__(self):
        self.search(None)

    def search(self, meta) -> "InstaRSSearch":
        """The search settings (:class:`InstaRSSearch`) for a model with metadata ``meta`` (its
        training sigma is the default extra start)."""
        exps = parse_float_list(self.instars_exponents, "--instars-exponents")
        if self.instars_train_sigmas is None:
            ts = training_sigma(meta)
            train = () if ts is None else (ts,)
        else:
            train = parse_float_list(self.instars_train_sigmas, "--instars-train-sigmas")
        return InstaRSSearch(exponents=tuple(exps), train_sigmas=tuple(train), sigma_min=self.instars_min,
                             sigma_max=self.instars_max, n=self.instars_n, n0=self.instars_n0,
                             steps=self.instars_steps, eta=self.instars_eta, alpha=self.instars_alpha).validate()


@dataclasses.dataclass(frozen=True)
class InstaRSSearch:
    """The resolved search settings the algorithm runs with."""

    exponents: tuple = (-1, 0, 1)
    train_sigmas: tuple = ()
    sigma_min: float | None = None  # None: sigma0 / 4
    sigma_max: float | None = None  # None: 4 * sigma0
    n: int = 256
    n0: int = 100
    steps: int = 4
    eta: float = 0.25
    alpha: float = 0.001

    def validate(self):
        check_count("--instars-n", self.n)
        check_count("--instars-n0", self.n0)
        check_count("--instars-steps", self.steps, minimum=0)
        if not (0.0 < self.eta < 1.0):
            raise RsjaxError(f"--instars-eta must be in (0, 1), got {self.eta}")
        if not (0.0 < self.alpha < 1.0):
            raise RsjaxError(f"--instars-alpha must be in (0, 1), got {self.alpha}")
        for name, v in (("--instars-min", self.sigma_min), ("--instars-max", self.sigma_max)):
            if v is not None and not np.isfinite(v):
                raise RsjaxError(f"{name} must be finite, got {v}")
        if not self.exponents and not self.train_sigmas:
            raise RsjaxError("Insta-RS needs at least one start (--instars-exponents or --instars-train-sigmas)")
        for s in self.train_sigmas:
            check_positive("--instars-train-sigmas", s)
        if self.sigma_min is not None:
            check_positive("--instars-min", self.sigma_min)
        if self.sigma_max is not None:
            check_positive("--instars-max", self.sigma_max)
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_max < self.sigma_min:
            raise RsjaxError(f"--instars-max ({self.sigma_max}) is below --instars-min ({self.sigma_min})")
        return self

    def bounds(self, sigma0):
        lo = self.sigma_min if self.sigma_min is not None else sigma0 / 4.0
        hi = self.sigma_max if self.sigma_max is not None else sigma0 * 4.0
        return lo, hi


def start_set(sigma0: float, cfg: InstaRSSearch):
    """Sorted start levels S for one image (rule 2 of the module doc)."""
    lo, hi = cfg.bounds(sigma0)
    cand = [sigma0 * 2.0 ** k for k in cfg.exponents] + list(cfg.train_sigmas)
    s = sorted({round(float(v), 12) for v in cand if lo - BOUND_SLACK <= v <= hi + BOUND_SLACK})
    if not s:
        raise RsjaxError(f"no Insta-RS start lies in [{lo}, {hi}] for sigma0 = {sigma0}")
    return s


def draws_per_image(num_starts: int, cfg: InstaRSSearch) -> int:
    return cfg.n0 + num_starts * cfg.n + 3 * cfg.steps * num_starts * cfg.n


class InstaRS:
    """``choose(x, sigma0, search_keys) -> (sigma, info)`` for a batch of images."""

    def __init__(self, classifier, cfg: InstaRSSearch, batch_size: int = DEFAULT_BATCH_SIZE):
        self.cfg = cfg.validate()
        self.counter = candidate_counter(classifier, batch_size)

    def choose(self, x, sigma0, search_keys):
        cfg = self.cfg
        x = np.asarray(x, np.float32)
        m = x.shape[0]
        sigma0 = np.broadcast_to(np.asarray(sigma0, np.float64), (m,)).copy()
        starts = [start_set(float(s), cfg) for s in sigma0]
        width = max(len(s) for s in starts)
        S = np.array([s + [s[0]] * (width - len(s)) for s in starts])  # pad with a duplicate start
        lo = np.array([cfg.bounds(float(s))[0] for s in sigma0])[:, None]
        hi = np.array([cfg.bounds(float(s))[1] for s in sigma0])[:, None]
        rows = np.arange(m)[:, None]

        c0 = self.counter.candidates(x, sigma0[:, None], round_keys(search_keys, 0), cfg.n0)
        cA = np.argmax(class_counts(c0[:, 0]), axis=-1)

        sigma = S.copy()
        counts = self.counter.candidates(x, sigma, round_keys(search_keys, 1), cfg.n)
        rhat, _ = estimated_radius(counts, cA[:, None], sigma, cfg.alpha)
        eta = np.full(sigma.shape, cfg.eta)
        for t in range(1, cfg.steps + 1):
            cand = np.stack([sigma, np.clip(sigma * (1 - eta), lo, hi), np.clip(sigma * (1 + eta), lo, hi)], -1)
            counts = self.counter.candidates(x, cand.reshape(m, -1), round_keys(search_keys, t + 1), cfg.n)
            r3, _ = estimated_radius(counts.reshape(m, width, 3, -1), cA[:, None, None], cand, cfg.alpha)
            # ties: stay (index 0), then the smaller sigma (index 1)
            j = np.argmax(r3, axis=-1)
            sigma = np.take_along_axis(cand, j[..., None], -1)[..., 0]
            rhat = np.take_along_axis(r3, j[..., None], -1)[..., 0]
            eta = np.where(j == 0, eta / 2.0, eta)
        best = np.argmax(rhat, axis=1)
        info = {"sigma_start": S[rows[:, 0], best], "search_radius": rhat[rows[:, 0], best],
                "starts": S, "cA": cA}
        return sigma[rows[:, 0], best], info


# --- the method ----------------------------------------------------------------------------------
def build(cfg: InstaRSConfig, classifier, *, seed, batch_size=DEFAULT_BATCH_SIZE, n=None):
    """chooser(x, idx, sigma0) -> (sigma_x, {'sigma_start', 'search_radius'}) (``n``, the
    certificate's N, is not used)."""
    _, meta, _ = unpack(classifier)
    insta = InstaRS(classifier, cfg.search(meta), batch_size)

    def chooser(x, idx, sigma0):
        sigma, info = insta.choose(x, sigma0, method_keys(seed, idx, "search"))
        return sigma, {"sigma_start": info["sigma_start"], "search_radius": info["search_radius"]}

    chooser.insta = insta
    return chooser


METHOD = register(Method(
    name="instars",
    guarantee="per-input",
    config=InstaRSConfig,
    build=build,
    memory=memory_factory("instars_memory"),
    extra_columns=("sigma_start", "search_radius"),
))
