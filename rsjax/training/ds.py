"""Data-dependent smoothing in training: DS-Gaussian and DS-MACER (DDRS, Alfarra et al. 2022, section 4.2).

Ground truth: MotasemAlfarra/Data_Dependent_Randomized_Smoothing (commit 3a06e82),
``ImageNet/train_rs.py`` (DS-Cohen, here ``ddrs-gaussian``) and ``CIFAR10/train_macer.py``
(DS-MACER, here ``ddrs-macer``); spec ``algorithms.md`` sections 4.2 and 12.3.

Every training example i has its own noise level sigma_i, a table row (the per-example state of
:mod:`rsjax.training.objectives`, sharded with the data, checkpointed), initialised to ``sig0_tr``.
Each time example i is in a batch (from epoch ``--ds-start-epoch`` on):

1. **sigma update**, the network frozen (``stop_gradient`` of the parameters): ``K_tr`` steps of
   gradient ascent on the same differentiable radius surrogate that test-time DDRS uses
   (:func:`rsjax.methods.ddrs.surrogate_radius`),

       psi_i(sigma) = (1/n) sum_j softmax(f(x_i + sigma eps_ij)),
       R_i(sigma)   = sigma/2 (Phi^-1(clip psi_(1)) - Phi^-1(clip psi_(2))),   clip to [lo, hi]
       sigma_i     <- B(sigma_i + lr_sig dR_i/dsigma_i)

   with fresh reparameterised noise eps each step (``n = gaussian_num_ds``), derivatives through
   sigma eps and the network, the whole batch at once (:func:`radius_slopes`: ``jax.grad`` of
   sum_i R_i when BatchNorm batch statistics couple the examples, as the reference; otherwise
   R_i depends only on sigma_i and one forward-mode ``jax.jvp`` gives every dR_i/dsigma_i), the
   K_tr steps inside the jitted train step (:func:`ascend_sigma`). B is the optional bound
   ``[--ds-sigma-min, --ds-sigma-max]`` (the reference has none) and always a floor at
   :data:`rsjax.methods.ddrs.SIGMA_FLOOR`, so a sigma is never <= 0.
2. **training step at the updated sigmas** (the sigma is a constant for the parameter gradient):

   - DS-Gaussian: mean_i -log(softmax(f(x_i + sigma_i eps_i))[y_i] + 1e-10), one copy per example
     (``train_rs.py``: ``compute_loss`` of the softmax outputs, ``gaussian_num`` 1);
   - DS-MACER: with p_i = (1/k) sum_j softmax(f(x_i + sigma_i eps_ij)) over k copies,
     L = mean_i -log(p_i[y_i] + 1e-10) + lambda * mean_{i correct} relu(gamma - sigma_i/2 (Phi^-1(clip p_(1)) - Phi^-1(clip p_(2))))
     (``train_macer.py``: ``compute_loss`` + ``lamda * macer_loss``): temperature 1 (the
     reference's DS loss has no beta), the same clip, "correct" = argmax p_i = y_i, the hinge
     averaged over the correct examples. A batch without a correct example has a robustness term of
     0 (the reference takes the mean of an empty tensor: NaN); ``--ds-macer-average batch`` divides
     by B instead (MACER's ``/ B``).

Reference quirks as settings: ``--ds-bn train`` (default) runs the sigma passes with BatchNorm in
train mode and lets each pass update the running averages, as the reference does (its
``model.eval()`` is commented out); ``frozen`` uses the batch statistics but keeps the running
averages. Bounds default to none. The reference gives copy r = i*k + j of the k training copies the
sigma of example r mod B (``sigma.repeat((1, k, 1, 1))`` of a 1-D tensor tiles it), so with k > 1
the copies of an example mostly get other examples' sigmas; ``--ds-copy-sigma example`` (default)
uses sigma_i for every copy of example i, ``reference`` reproduces the tiling. DS starts at ``--ds-start-epoch`` (the reference's
``--epoch-switch``, 0 in both scripts); before it the table stays at sig0_tr and the model trains
at it (the reference calls ``get_sigma`` with 0 iterations then).

Noise: the training noise of example i is the objective key's own draw (``ctx.keys[i]``, as
:func:`rsjax.training.objectives.gaussian_loss` and ``macer_loss``, so ``--ds-steps 0`` trains
exactly like ``gaussian`` up to the 1e-10 of the loss); ascent step k draws from
``fold_in(ctx.keys[i], k + 1)``. Keys depend on (seed, dataset index, epoch) only.

Outputs: the table is in every checkpoint (restored bit for bit) and, after every epoch,
``OUTDIR/sigma_train.npy`` (float32, one row per example of the training selection, in its order),
``OUTDIR/sigma_train_hist/epoch_NNNN.png`` and ``sigma_mean/min/median/max`` in ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from rsjax.config import check, option
from rsjax.methods.ddrs import SIGMA_FLOOR, surrogate_radius
from rsjax.training.objectives import Context, LossOutput, Objective, per_example_normal, register

BN_MODES = ("train", "frozen")
LAYOUTS = ("example", "reference")
AVERAGES = ("correct", "batch")
LOG_EPS = 1e-10  # the references' log(p + 1e-10)


@dataclasses.dataclass(frozen=True)
class DSConfig:
    """Options of DS-Gaussian and DS-MACER. ``None`` takes the reference script's value for the
    objective: ``ImageNet/train_rs.py`` for ``ddrs-gaussian``, ``CIFAR10/train_macer.py`` for
    ``ddrs-macer`` (:data:`REFERENCE_DEFAULTS`)."""

    ds_sigma0: Optional[float] = option(None, "sig0_tr: initial sigma of every training example "
                                              "(none: --sigma; the reference's default is 0.12)")
    ds_lr: float = option(1e-4, "lr_sig: gradient-ascent step on sigma (reference 1e-4; 0 keeps sigma)")
    ds_steps: Optional[int] = option(None, "K_tr = iter_sig_tr: ascent steps per batch (none: 1 for "
                                           "ddrs-gaussian, train_rs.py; 10 for ddrs-macer, train_macer.py)")
    ds_n: Optional[int] = option(None, "gaussian_num_ds: noise draws per ascent step (none: 1 / 64)")
    ds_clamp_lo: float = option(0.02, "lower clip of the top-2 probabilities before Phi^-1 (reference 0.02)")
    ds_clamp_hi: float = option(0.98, "upper clip (reference 0.98)")
    ds_start_epoch: int = option(0, "0-based epoch from which sigma is optimised (reference --epoch-switch 0)")
    ds_sigma_min: Optional[float] = option(None, "lower bound of sigma after each step (none, as the "
                                                 f"reference: no bound; sigma is always >= {SIGMA_FLOOR})")
    ds_sigma_max: Optional[float] = option(None, "upper bound of sigma after each step (none, as the reference: "
                                                 "no bound)")
    ds_bn: str = option("train", "BatchNorm in the sigma passes: train (reference: batch statistics, "
                                 "running averages updated by every pass) or frozen (running averages kept)",
                        choices=BN_MODES)
    ds_gauss_num: Optional[int] = option(None, "k: noisy copies per example in the training loss "
                                               "(none: 1 for ddrs-gaussian, 64 for ddrs-macer)")
    ds_lbd: float = option(12.0, "DS-MACER lambda: weight of the hinge (train_macer.py --lbd 12)")
    ds_gamma: float = option(8.0, "DS-MACER gamma: hinge on the radius (train_macer.py --gam 8)")
    ds_copy_sigma: str = option("example", "sigma of the k training copies: example (copy j of example i at "
                                           "sigma_i) or reference (copy r = i*k + j at sigma_(r mod B), what "
                                           "train_macer.py's sigma.repeat((1, k, 1, 1)) on a 1-D sigma does)",
                                choices=LAYOUTS)
    ds_macer_average: str = option("correct", "DS-MACER hinge averaged over the correct examples "
                                              "(reference; 0 when none) or over the batch", choices=AVERAGES)

    def __post_init__(self):
        check(self.ds_sigma0 is None or self.ds_sigma0 > 0, f"--ds-sigma0 must be > 0, got {self.ds_sigma0}")
        check(self.ds_lr >= 0, f"--ds-lr must be >= 0, got {self.ds_lr}")
        check(self.ds_steps is None or self.ds_steps >= 0, f"--ds-steps must be >= 0, got {self.ds_steps}")
        check(self.ds_n is None or self.ds_n >= 1, f"--ds-n must be >= 1, got {self.ds_n}")
        check(0.0 < self.ds_clamp_lo < self.ds_clamp_hi < 1.0,
              f"--ds-clamp-lo/--ds-clamp-hi must satisfy 0 < lo < hi < 1, got {self.ds_clamp_lo}, {self.ds_clamp_hi}")
        check(self.ds_start_epoch >= 0, f"--ds-start-epoch must be >= 0, got {self.ds_start_epoch}")
        check(self.ds_sigma_min is None or self.ds_sigma_min > 0,
              f"--ds-sigma-min must be > 0, got {self.ds_sigma_min}")
        check(self.ds_sigma_max is None or self.ds_sigma_max > max(self.ds_sigma_min or 0.0, SIGMA_FLOOR),
              f"--ds-sigma-max must be > --ds-sigma-min and > {SIGMA_FLOOR}, got {self.ds_sigma_max}")
        check(self.ds_gauss_num is None or self.ds_gauss_num >= 1, f"--ds-gauss-num must be >= 1, got {self.ds_gauss_num}")
        check(self.ds_lbd >= 0, f"--ds-lbd must be >= 0, got {self.ds_lbd}")
        check(self.ds_gamma > 0, f"--ds-gamma must be > 0, got {self.ds_gamma}")


# (K_tr, gaussian_num_ds, k) of the reference scripts
REFERENCE_DEFAULTS = {
    "ddrs-gaussian": dict(ds_steps=1, ds_n=1, ds_gauss_num=1),  # ImageNet/train_rs.py
    "ddrs-macer": dict(ds_steps=10, ds_n=64, ds_gauss_num=64),  # CIFAR10/train_macer.py
}


def resolved(cfg: DSConfig, name: str) -> DSConfig:
    """``cfg`` with every ``None`` count replaced by the reference script's value for ``name``."""
    fill = {k: v for k, v in REFERENCE_DEFAULTS[name].items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **fill)


def bound_sigma(sigma, lo: Optional[float], hi: Optional[float]):
    """clip(sigma, max(lo, SIGMA_FLOOR), hi): the optional bounds, never <= 0."""
    sigma = jnp.maximum(sigma, max(lo or 0.0, SIGMA_FLOOR))
    return sigma if hi is None else jnp.minimum(sigma, hi)


def ascent_noise(keys, k, n: int, shape, dtype=jnp.float32):
    """eps (B, n, *shape) of ascent step k: ``normal(fold_in(keys_i, k + 1))``."""
    sub = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, jnp.asarray(k, jnp.uint32) + 1)
    return per_example_normal(sub, (n,) + tuple(shape), dtype)


def radius_slopes(radii, sigma, coupled: bool):
    """dR_i/dsigma_i (B,) and the aux of ``radii(sigma) -> (R (B,), aux)``.

    ``coupled`` (BatchNorm in train mode: the batch statistics make every R_i depend on every
    sigma_j): the gradient of sum_i R_i, i.e. sum_i dR_i/dsigma_j for each j, the reference's
    ``torch.autograd.grad(radius.sum(), sig)`` (one forward and one backward pass to the input).
    Otherwise dR_i/dsigma_j = 0 for i != j, so the forward-mode derivative along sigma + t * 1 is the
    same vector, dR_i/dsigma_i, at the cost of one forward pass and its tangent (forward
    convolutions only, no stored activations, no transposed convolutions).
    """
    if coupled:
        def total(s):
            r, aux = radii(s)
            return r.sum(), aux

        return jax.grad(total, has_aux=True)(sigma)
    _, slopes, aux = jax.jvp(radii, (sigma,), (jnp.ones_like(sigma),), has_aux=True)
    return slopes, aux


def ascend_sigma(apply_fn, params, batch_stats, x, sigma, keys, *, steps: int, lr: float, n: int,
                 clamp, lo=None, hi=None, bn: str = "train"):
    """The K_tr ascent steps on each example's sigma (module doc, step 1), network frozen.

    ``apply_fn(params, batch_stats, x) -> (logits, batch_stats)`` in train mode. Returns the new
    sigmas (B,) and the batch statistics after the passes (``bn="train"``: updated by each of the
    K_tr passes, as the reference; ``"frozen"``: unchanged). The slopes come from
    :func:`radius_slopes`, coupled iff the network has batch statistics. Uncoupled, the K_tr steps
    are one ``lax.fori_loop`` (forward convolutions only). Coupled, they are unrolled (K_tr is
    static; compilation grows linearly with it): XLA's CPU backend brings convolutions to its fast
    (Eigen) form in the entry computation only (``xla/service/cpu/conv_canonicalization.cc``), so
    the transposed convolutions of a backward pass inside a ``while`` body run on its slow path.
    """
    params = jax.lax.stop_gradient(params)
    clamp = (float(clamp[0]), float(clamp[1]))
    coupled = bool(jax.tree_util.tree_leaves(batch_stats))

    def step(k, sigma, stats):
        eps = ascent_noise(keys, k, n, x.shape[1:], x.dtype)

        def radii(s):
            out = []  # the pass's running averages, returned as aux from inside the trace

            def f(xb):
                logits, new_stats = apply_fn(params, stats, xb)
                out.append(new_stats)
                return logits

            return surrogate_radius(f, x, s, eps, clamp), out[0]

        slopes, new_stats = radius_slopes(radii, sigma, coupled)
        return bound_sigma(sigma + lr * slopes, lo, hi), (new_stats if bn == "train" else stats)

    if steps == 0:
        return sigma, batch_stats
    carry = (jnp.asarray(sigma, jnp.float32), batch_stats)
    if coupled:
        for k in range(steps):
            carry = step(k, *carry)
    else:
        carry = jax.lax.fori_loop(0, steps, lambda k, c: step(k, *c), carry)
    sigma, stats = carry
    return jax.lax.stop_gradient(sigma), stats


def _updated_sigma(cfg: DSConfig, params, ctx: Context):
    sigma = ctx.example_state["sigma"]
    if ctx.phase == 0 or cfg.ds_steps == 0:
        return sigma, ctx.batch_stats
    return ascend_sigma(ctx.apply_fn, params, ctx.batch_stats, ctx.x, sigma, ctx.keys, steps=cfg.ds_steps,
                        lr=cfg.ds_lr, n=cfg.ds_n, clamp=(cfg.ds_clamp_lo, cfg.ds_clamp_hi),
                        lo=cfg.ds_sigma_min, hi=cfg.ds_sigma_max, bn=cfg.ds_bn)


def copy_sigmas(sigma, k: int, layout: str = "example"):
    """The noise level of each of the B * k copies (row r = i * k + j): sigma_i (``example``), or
    sigma_(r mod B) (``reference``: ``sigma.repeat((1, k, 1, 1)).view(-1, 1, 1, 1)`` of a 1-D sigma in
    ``CIFAR10/train_macer.py`` tiles the batch's sigmas k times instead of repeating each)."""
    if layout == "reference":
        return jnp.tile(sigma, k)
    return jnp.repeat(sigma, k)


def noisy_copies(x, sigma, keys, k: int, layout: str = "example"):
    """x_i + s_r eps_ij for j < k, an example's copies adjacent (row r = i * k + j): (B * k, H, W, C),
    s_r from :func:`copy_sigmas`; eps from the examples' own keys (the draws of
    :func:`rsjax.training.objectives.macer_loss`)."""
    b = x.shape[0]
    eps = per_example_normal(keys, (k,) + x.shape[1:], x.dtype).reshape((b * k,) + x.shape[1:])
    s = copy_sigmas(sigma, k, layout).astype(x.dtype)
    return jnp.repeat(x, k, axis=0) + s[:, None, None, None] * eps


def smoothed_probs(logits, b: int, k: int):
    """p_i = (1/k) sum_j softmax(z_ij): (B, K) from the logits (B * k, K)."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, -1).mean(axis=1)


def ds_macer_hinge(p, y, sigma, *, gamma: float, clamp, average: str = "correct"):
    """The DS-MACER robustness term and the per-example hinge (module doc).

    p (B, K) smoothed probabilities; returns (term, hinge (B,) masked to the correct examples,
    correct (B,)). The clip keeps Phi^-1 finite, so no double where is needed.
    """
    from jax.scipy.special import ndtri

    top, top_idx = jax.lax.top_k(p, 2)
    correct = top_idx[:, 0] == y
    c = jnp.clip(top, clamp[0], clamp[1])
    radius = jax.lax.stop_gradient(sigma) / 2 * (ndtri(c[:, 0]) - ndtri(c[:, 1]))
    hinge = jnp.where(correct, jax.nn.relu(gamma - radius), 0.0)
    denom = jnp.maximum(correct.sum(), 1) if average == "correct" else p.shape[0]
    return hinge.sum() / denom, hinge, correct


def _nll(p, y):
    return -jnp.log(jnp.take_along_axis(p, y[:, None], axis=1)[:, 0] + LOG_EPS)


def _sigma_metrics(sigma):
    return {"sigma": sigma.sum()}


def ds_gaussian_loss(cfg: DSConfig, params, ctx: Context):
    """DS-Gaussian (DS-Cohen, ``ImageNet/train_rs.py``): sigma update, then the NLL at sigma_i."""
    cfg = resolved(cfg, "ddrs-gaussian")
    sigma, stats = _updated_sigma(cfg, params, ctx)
    b, k = ctx.x.shape[0], cfg.ds_gauss_num
    logits, stats = ctx.apply_fn(params, stats, noisy_copies(ctx.x, sigma, ctx.keys, k))
    p = smoothed_probs(logits, b, k)
    nll = _nll(p, ctx.y)
    metrics = {"loss": nll.sum(), **_sigma_metrics(sigma)}
    return nll.mean(), LossOutput(batch_stats=stats, metrics=metrics, correct=jnp.argmax(p, -1) == ctx.y,
                                  example_state={"sigma": sigma})


def ds_macer_loss(cfg: DSConfig, params, ctx: Context):
    """DS-MACER (``CIFAR10/train_macer.py``): sigma update, then NLL + lambda * hinge at sigma_i."""
    cfg = resolved(cfg, "ddrs-macer")
    sigma, stats = _updated_sigma(cfg, params, ctx)
    b, k = ctx.x.shape[0], cfg.ds_gauss_num
    logits, stats = ctx.apply_fn(params, stats, noisy_copies(ctx.x, sigma, ctx.keys, k, cfg.ds_copy_sigma))
    p = smoothed_probs(logits, b, k)
    nll = _nll(p, ctx.y)
    term, hinge, correct = ds_macer_hinge(p, ctx.y, sigma, gamma=cfg.ds_gamma,
                                          clamp=(cfg.ds_clamp_lo, cfg.ds_clamp_hi), average=cfg.ds_macer_average)
    loss = nll.mean() + cfg.ds_lbd * term
    metrics = {"loss": loss * b, "classification_loss": nll.sum(), "robustness_loss": hinge.sum(),
               **_sigma_metrics(sigma)}
    return loss, LossOutput(batch_stats=stats, metrics=metrics, correct=correct, example_state={"sigma": sigma})


# ----------------------------------------------------------------------------- table, phases, outputs


def init_sigma_table(sigma0):
    def init(cfg, num_examples: int, sigma: float) -> dict:
        s0 = sigma if sigma0(cfg) is None else sigma0(cfg)
        return {"sigma": np.full(int(num_examples), s0, np.float32)}

    return init


def ds_phase(cfg: DSConfig, epoch: int) -> int:
    """0 before ``--ds-start-epoch`` (sigma fixed), 1 from it on (sigma optimised)."""
    return int(epoch >= cfg.ds_start_epoch)


def sigma_summary(sigma) -> dict:
    s = np.asarray(sigma, np.float64)
    return {"sigma_mean": float(s.mean()), "sigma_min": float(s.min()), "sigma_median": float(np.median(s)),
            "sigma_max": float(s.max())}


def write_sigma_table(outdir, epoch: int, sigma, title: str) -> dict:
    """``OUTDIR/sigma_train.npy`` (atomic replace) and the epoch's histogram PNG; returns the summary."""
    import os
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir = Path(outdir)
    sigma = np.asarray(sigma, np.float32)
    tmp = outdir / "sigma_train.npy.tmp"
    with open(tmp, "wb") as fh:
        np.save(fh, sigma)
    os.replace(tmp, outdir / "sigma_train.npy")
    summary = sigma_summary(sigma)
    hist_dir = outdir / "sigma_train_hist"
    hist_dir.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(sigma, bins=50, color="tab:blue")
    ax.axvline(summary["sigma_median"], color="k", lw=1, ls="--", label=f"median {summary['sigma_median']:.4f}")
    ax.set_xlabel("sigma_i")
    ax.set_ylabel("training examples")
    ax.set_title(f"{title}: epoch {epoch + 1}, mean {summary['sigma_mean']:.4f}, "
                 f"[{summary['sigma_min']:.4f}, {summary['sigma_max']:.4f}]", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(hist_dir / f"epoch_{epoch + 1:04d}.png", dpi=100)
    plt.close(fig)
    return summary


def sigma_table_epoch_end(title):
    """``Objective.on_epoch_end`` of an objective with a ``sigma`` table: the files and the log line."""

    def on_epoch_end(cfg, epoch: int, example_state: dict, outdir) -> dict:
        summary = write_sigma_table(outdir, epoch, example_state["sigma"], title)
        print(f"sigma_train: mean {summary['sigma_mean']:.5f} min {summary['sigma_min']:.5f} "
              f"max {summary['sigma_max']:.5f}", flush=True)
        return summary

    return on_epoch_end


for _name, _loss, _help in (
        ("ddrs-gaussian", ds_gaussian_loss,
         "DS-Gaussian (DDRS DS-Cohen): per-example sigma by gradient ascent on the radius surrogate, "
         "then Gaussian augmentation at it (ImageNet/train_rs.py)"),
        ("ddrs-macer", ds_macer_loss,
         "DS-MACER (DDRS): per-example sigma by gradient ascent, then NLL + lambda * radius hinge at it "
         "(CIFAR10/train_macer.py)")):
    register(Objective(_name, DSConfig, _loss, init_example_state=init_sigma_table(lambda c: c.ds_sigma0),
                       phase=ds_phase, on_epoch_end=sigma_table_epoch_end(_name), help=_help))

__all__ = ["DSConfig", "REFERENCE_DEFAULTS", "resolved", "bound_sigma", "ascent_noise", "radius_slopes",
           "ascend_sigma",
           "noisy_copies", "smoothed_probs", "ds_macer_hinge", "ds_gaussian_loss", "ds_macer_loss", "ds_phase",
           "sigma_summary", "write_sigma_table", "sigma_table_epoch_end", "init_sigma_table"]
