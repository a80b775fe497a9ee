"""Insta-RS Train (Chen et al., arXiv 2103.04436): two-stage training with a per-example noise level.

**Derived from the abstract only.** No public code and no paper body were available (spec
``algorithms.md`` section 6): the abstract says "a novel two-stage training algorithm that
adaptively adjusts and customizes the noise level of each training example". Everything below
is the spec's recommended rule, every rule and constant a setting, none of them the paper's.

Stage 1 (epochs ``0 .. --instars-stage1-epochs - 1``): ordinary training at the global sigma
(``--sigma``), Gaussian augmentation or MACER (``--instars-base``); the table stays at sigma.

Stage 2 (the remaining epochs): every example keeps sigma_i (a table row of the per-example state,
checkpointed and written like DS training's). On every ``--instars-every``-th epoch of stage 2, each
time example i is in a batch, ``n`` noisy forward passes of the frozen network (parameters
``stop_gradient``; BatchNorm ``--instars-bn``) at sigma_i give the statistic

    s_i = (1/n) sum_j 1[argmax f(x_i + sigma_i eps_ij) = y_i]      (``vote``)
    s_i = (1/n) sum_j softmax(f(x_i + sigma_i eps_ij))[y_i]         (``soft``)

and the rule

    sigma_i <- clip(sigma_i * m, lo, hi)  if s_i >= up    (correct with margin under noise: more noise)
    sigma_i <- clip(sigma_i / m, lo, hi)  if s_i < down   (otherwise: less noise; down = up by default)

after which the step trains at the new sigma_i (the base loss with each example's sigma). For the
``vote`` statistic the table has a known equilibrium: with p_i(sigma) the probability that one
noisy copy is classified correctly, sigma_i settles where P(Binomial(n, p_i) >= ceil(up n)) = 1/2;
for a half-space at distance d_i, p_i = Phi(d_i / sigma), so sigma_i -> d_i / Phi^-1(p_half)
(``tests/test_train_instars.py``).

Noise: the training noise is the objective key's own draw (as ``gaussian`` / ``macer``), the
adaptation draws come from ``fold_in(ctx.keys[i], 1)``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rsjax.config import check, option
from rsjax.training.ds import bound_sigma, noisy_copies, sigma_table_epoch_end
from rsjax.training.objectives import Context, LossOutput, Objective, macer_terms, per_example_normal, register

BASES = ("gaussian", "macer")
STATISTICS = ("vote", "soft")
BN_MODES = ("frozen", "train")


@dataclasses.dataclass(frozen=True)
class InstaRSTrainConfig:
    """Options of ``--method instars`` (all [D]: derived from the abstract, module doc)."""

    instars_stage1_epochs: int = option(5, "epochs of stage 1 (global sigma) before the per-example stage")
    instars_base: str = option("gaussian", "loss of both stages: gaussian (Cohen) or macer", choices=BASES)
    instars_n: int = option(8, "noisy forward passes per example for the adaptation statistic")
    instars_statistic: str = option("vote", "vote: fraction of correct noisy predictions; soft: mean softmax "
                                            "probability of the label", choices=STATISTICS)
    instars_up: float = option(0.8, "raise sigma_i when the statistic is >= this")
    instars_down: Optional[float] = option(None, "lower sigma_i when the statistic is < this (none: = up)")
    instars_factor: float = option(1.1, "multiplicative step m: sigma * m up, sigma / m down")
    instars_every: int = option(1, "adapt on every E-th epoch of stage 2")
    instars_sigma_min: float = option(0.05, "lower bound of sigma_i")
    instars_sigma_max: float = option(1.0, "upper bound of sigma_i")
    instars_bn: str = option("frozen", "BatchNorm in the adaptation passes: frozen (batch statistics, running "
                                       "averages kept) or train (running averages updated)", choices=BN_MODES)
    instars_gauss_num: int = option(16, "MACER base: k noisy copies")
    instars_lbd: float = option(12.0, "MACER base: lambda")
    instars_gamma: float = option(8.0, "MACER base: hinge gamma")
    instars_beta: float = option(16.0, "MACER base: inverse temperature beta")

    def __post_init__(self):
        check(self.instars_stage1_epochs >= 0, f"--instars-stage1-epochs must be >= 0, got {self.instars_stage1_epochs}")
        check(self.instars_n >= 1, f"--instars-n must be >= 1, got {self.instars_n}")
        check(0.0 < self.instars_up <= 1.0, f"--instars-up must be in (0, 1], got {self.instars_up}")
        check(self.instars_down is None or 0.0 <= self.instars_down <= self.instars_up,
              f"--instars-down must be in [0, --instars-up], got {self.instars_down}")
        check(self.instars_factor > 1.0, f"--instars-factor must be > 1, got {self.instars_factor}")
        check(self.instars_every >= 1, f"--instars-every must be >= 1, got {self.instars_every}")
        check(0.0 < self.instars_sigma_min < self.instars_sigma_max,
              f"--instars-sigma-min/--instars-sigma-max must satisfy 0 < min < max, got "
              f"{self.instars_sigma_min}, {self.instars_sigma_max}")
        check(self.instars_gauss_num >= 1, f"--instars-gauss-num must be >= 1, got {self.instars_gauss_num}")
        check(self.instars_lbd >= 0, f"--instars-lbd must be >= 0, got {self.instars_lbd}")
        check(self.instars_gamma > 0, f"--instars-gamma must be > 0, got {self.instars_gamma}")
        check(self.instars_beta > 0, f"--instars-beta must be > 0, got {self.instars_beta}")


def adaptation_statistic(logits, y, n: int, statistic: str):
    """s_i from the logits (B * n, K) of the n noisy copies of each example (module doc)."""
    b = y.shape[0]
    logits = logits.astype(jnp.float32).reshape(b, n, -1)
    if statistic == "soft":
        return jnp.take_along_axis(jax.nn.softmax(logits, -1), y[:, None, None], axis=-1)[..., 0].mean(1)
    return (jnp.argmax(logits, -1) == y[:, None]).mean(1)


def adapt_rule(sigma, stat, cfg: InstaRSTrainConfig):
    """sigma * m where s >= up, sigma / m where s < down, else sigma; clipped to the bounds."""
    down = cfg.instars_up if cfg.instars_down is None else cfg.instars_down
    m = jnp.float32(cfg.instars_factor)
    new = jnp.where(stat >= cfg.instars_up, sigma * m, jnp.where(stat < down, sigma / m, sigma))
    return bound_sigma(jnp.clip(new, cfg.instars_sigma_min, cfg.instars_sigma_max), None, None)


def adapt_sigma(cfg: InstaRSTrainConfig, params, ctx: Context):
    """The adaptation of stage 2 (module doc): (new sigma (B,), batch statistics, statistic (B,))."""
    sigma = ctx.example_state["sigma"]
    n = cfg.instars_n
    sub = jax.vmap(jax.random.fold_in, in_axes=(0, None))(ctx.keys, jnp.uint32(1))
    logits, stats = ctx.apply_fn(jax.lax.stop_gradient(params), ctx.batch_stats, noisy_copies(ctx.x, sigma, sub, n))
    stat = adaptation_statistic(jax.lax.stop_gradient(logits), ctx.y, n, cfg.instars_statistic)
    now = (ctx.epoch - cfg.instars_stage1_epochs) % cfg.instars_every == 0
    new = jnp.where(now, adapt_rule(sigma, stat, cfg), sigma)
    return new, (stats if cfg.instars_bn == "train" else ctx.batch_stats), stat


def instars_loss(cfg: InstaRSTrainConfig, params, ctx: Context):
    """Stage 1 (phase 0): the base loss at the table's sigma (= --sigma); stage 2: adapt, then train."""
    sigma = ctx.example_state["sigma"]
    stats = ctx.batch_stats
    if ctx.phase == 1:
        sigma, stats, _ = adapt_sigma(cfg, params, ctx)
    sigma = jax.lax.stop_gradient(sigma)
    b = ctx.x.shape[0]
    if cfg.instars_base == "gaussian":
        eps = per_example_normal(ctx.keys, ctx.x.shape[1:], ctx.x.dtype)
        logits, stats = ctx.apply_fn(params, stats, ctx.x + sigma[:, None, None, None] * eps)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, ctx.y)
        metrics = {"loss": ce.sum(), "sigma": sigma.sum()}
        return ce.mean(), LossOutput(batch_stats=stats, metrics=metrics, correct=jnp.argmax(logits, -1) == ctx.y,
                                     example_state={"sigma": sigma})
    k = cfg.instars_gauss_num
    logits, stats = ctx.apply_fn(params, stats, noisy_copies(ctx.x, sigma, ctx.keys, k))
    logits = logits.reshape(b, k, -1)
    # MACER's terms per example (each with its own sigma_i), summed: rsjax.training.objectives.macer_terms
    lc, lr, correct = jax.vmap(lambda z, y, s: macer_terms(z[None], y[None], s, beta=cfg.instars_beta,
                                                           gamma=cfg.instars_gamma))(logits, ctx.y, sigma)
    total = lc.sum() + cfg.instars_lbd * lr.sum()
    metrics = {"loss": total, "classification_loss": lc.sum(), "robustness_loss": lr.sum(), "sigma": sigma.sum()}
    return total / b, LossOutput(batch_stats=stats, metrics=metrics, correct=correct[:, 0],
                                 example_state={"sigma": sigma})


def init_table(cfg, num_examples: int, sigma: float) -> dict:
    return {"sigma": np.full(int(num_examples), sigma, np.float32)}


def instars_phase(cfg: InstaRSTrainConfig, epoch: int) -> int:
    return int(epoch >= cfg.instars_stage1_epochs)


register(Objective("instars", InstaRSTrainConfig, instars_loss, init_example_state=init_table, phase=instars_phase,
                   on_epoch_end=sigma_table_epoch_end("instars"),
                   help="Insta-RS Train (derived from the abstract): stage 1 at --sigma, stage 2 adapts each "
                        "example's sigma from a few noisy passes and trains at it"))

__all__ = ["InstaRSTrainConfig", "adaptation_statistic", "adapt_rule", "adapt_sigma", "instars_loss",
           "instars_phase"]
