"""Training objectives of ``rsjax train``: a registry of plug-ins the generic train step calls.

An objective is an :class:`Objective`: a name, a frozen config dataclass (fields built with
:func:`rsjax.config.option`, so its flags come from :func:`rsjax.config.add_arguments` and its
recorded settings from :func:`rsjax.config.to_dict`) and pure functions. The train step
(:mod:`rsjax.training.step`) knows nothing about any objective; it

1. gathers the batch's rows of the objective's **per-example state** (a pytree of arrays with a
   leading axis over the training examples, e.g. a per-example sigma table of shape
   ``(num_examples,)``; sharded along the mesh axis ``"data"`` like the batch, stored in the
   :class:`~rsjax.training.state.TrainState` and in every orbax checkpoint, restored bit for bit);
2. builds a :class:`Context` (the augmented batch in [0, 1], labels, the examples' dataset indices
   and rows, one PRNG key per example, the train-mode network, the epoch and step);
3. differentiates ``objective.loss(cfg, params, ctx) -> (loss, LossOutput)`` with respect to
   ``params`` and applies the optax update;
4. writes ``LossOutput.example_state`` (the updated rows, or None) back into the table, keeps
   ``LossOutput.batch_stats`` (BatchNorm running averages after the objective's forward passes)
   and adds ``LossOutput.metrics`` to the epoch's running sums.

Contract of the functions (all but ``on_epoch_end`` run inside ``jax.jit``):

- ``loss(cfg, params, ctx) -> (loss, LossOutput)``: ``loss`` is the scalar minimised (a mean over
  the batch, as the references' ``loss.backward()``); ``ctx.apply_fn(params, batch_stats, x) ->
  (logits, new_batch_stats)`` runs the network in train mode (BatchNorm over all of ``x``, running
  averages updated as PyTorch does: momentum 0.1, unbiased variance). Call it as often as needed;
  thread the batch statistics and return the last ones. Use ``jax.lax.stop_gradient(params)`` for
  passes that must not train the network (e.g. a sigma ascent).
- ``LossOutput.metrics``: a dict of scalars, each a **sum over the batch's examples** (the epoch's
  value is the total divided by the number of examples, like PyTorch's ``AverageMeter`` weighted by
  batch size); ``"loss"`` (per-example loss summed) is required, other names are logged to
  ``metrics.jsonl`` as ``train_<name>``. ``LossOutput.correct`` (bool ``(B,)``) gives the train
  accuracy column.
- ``init_example_state(cfg, num_examples, sigma) -> dict`` of numpy arrays with leading axis
  ``num_examples`` (``{}``: no state). Row ``r`` belongs to the r-th example of the training
  selection (``ctx.row``), whatever its dataset index (``ctx.idx``).
- ``phase(cfg, epoch) -> int``: a *static* stage number (``ctx.phase``); the step is compiled once
  per distinct phase, so a two-stage objective (e.g. sigma fixed before ``--ds-start-epoch``,
  optimised after; a two-stage Insta-RS) may change its computation structurally by phase. The
  traced ``ctx.epoch`` (int32, 0-based) is there too for ``jnp.where`` switches.
- ``on_epoch_end(cfg, epoch, example_state, outdir) -> dict`` (optional; host side, on the writing
  process only, after the epoch's checkpoint): ``example_state`` is the full table as numpy
  (unpadded); write files under ``outdir`` (e.g. ``sigma_train.npy`` and a histogram PNG) and
  return extra epoch metrics (JSON-able scalars, logged to ``metrics.jsonl``).

Randomness: ``ctx.keys[i]`` is ``fold_in(fold_in(image_keys(seed, idx_i, "train"), epoch), 0)``
(:func:`example_keys`): it depends only on (seed, dataset index, epoch) - each example is seen
once per epoch - so training noise does not depend on the batch size, the number of devices or
hosts, or where a resumed run restarted. Derive several streams with ``jax.random.fold_in(key, j)``
or ``jax.random.split``. The "train" purpose is never used by certification.

Worked example, the Gaussian objective (Cohen et al. 2019, ``code/train.py``)::

    @dataclasses.dataclass(frozen=True)
    class GaussianConfig:
        pass                                  # sigma comes from --sigma (ctx.sigma)

    def gaussian_loss(cfg, params, ctx):
        eps = jax.vmap(lambda k: jax.random.normal(k, ctx.x.shape[1:], ctx.x.dtype))(ctx.keys)
        logits, batch_stats = ctx.apply_fn(params, ctx.batch_stats, ctx.x + ctx.sigma * eps)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, ctx.y)
        return ce.mean(), LossOutput(batch_stats=batch_stats, metrics={"loss": ce.sum()},
                                     correct=jnp.argmax(logits, -1) == ctx.y)

    register(Objective("gaussian", GaussianConfig, gaussian_loss,
                       help="cross-entropy on x + sigma * eps (Cohen et al. 2019)"))

A data-dependent objective adds ``init_example_state`` (e.g. ``{"sigma": np.full(n, 0.12,
np.float32)}``), reads ``ctx.example_state["sigma"]`` (the batch's rows), returns the updated rows
in ``LossOutput.example_state`` and writes them in ``on_epoch_end``; nothing in the step changes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rsjax.config import check, option
from rsjax.core.sampler import image_keys
from rsjax.errors import RsjaxError

TRAIN_PURPOSE = "train"


@flax.struct.dataclass
class Context:
    """Everything an objective's loss sees for one (global) batch of B examples.

    x: float32 (B, H, W, C), the augmented images in [0, 1] (no noise yet, not normalised: the
      normalisation is inside ``apply_fn``); y: int32 (B,) labels; idx: int32 (B,) dataset indices;
      row: int32 (B,) rows of the per-example state; keys: typed PRNG keys (B,) (module doc);
      example_state: the batch's rows of the per-example state (dict, leading axis B);
      batch_stats: BatchNorm running averages before the step; sigma: float32 scalar, ``--sigma``;
      epoch, step: int32 scalars (0-based epoch; global optimiser step before this update);
      apply_fn (static): ``(params, batch_stats, x) -> (logits, batch_stats)`` in train mode;
      phase (static): ``objective.phase(cfg, epoch)``; num_classes (static).
    """

    x: Any
    y: Any
    idx: Any
    row: Any
    keys: Any
    example_state: Any
    batch_stats: Any
    sigma: Any
    epoch: Any
    step: Any
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    phase: int = flax.struct.field(pytree_node=False, default=0)
    num_classes: int = flax.struct.field(pytree_node=False, default=10)


@flax.struct.dataclass
class LossOutput:
    """What an objective returns besides the loss (module doc): batch_stats after its forward
    passes; metrics (dict of per-batch sums over examples, ``"loss"`` required); correct (bool (B,));
    example_state (the batch's updated rows, same structure as ``Context.example_state``, or None)."""

    batch_stats: Any
    metrics: Any
    correct: Any
    example_state: Any = None


def no_example_state(cfg, num_examples: int, sigma: float) -> dict:
    return {}


def single_phase(cfg, epoch: int) -> int:
    return 0


@dataclasses.dataclass(frozen=True)
class Objective:
    """A registered training objective (module doc for the contract of each function)."""

    name: str
    config: type
    loss: Callable
    init_example_state: Callable = no_example_state
    phase: Callable = single_phase
    on_epoch_end: Optional[Callable] = None
    help: str = ""


OBJECTIVES: dict = {}


def register(objective: Objective) -> Objective:
    """Add ``objective`` to the registry (``rsjax train --method NAME``)."""
    if objective.name in OBJECTIVES:
        raise ValueError(f"training objective {objective.name!r} is already registered")
    OBJECTIVES[objective.name] = objective
    return objective


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        _load_plugins()
    if name not in OBJECTIVES:
        raise RsjaxError(f"unknown training method {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def _load_plugins():
    """Import optional objective modules that register themselves (data-dependent objectives)."""
    import importlib

    for mod in ("rsjax.training.ds", "rsjax.training.instars_train"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def example_keys(seed: int, idx, epoch, stream: int = 0):
    """One key per example: fold_in(fold_in(image_keys(seed, idx, "train"), epoch), stream).

    Stream 0 is the objective's (``Context.keys``); stream 1 the noise of the per-epoch test loss."""
    keys = image_keys(seed, idx, TRAIN_PURPOSE)
    epoch = jnp.asarray(epoch, jnp.uint32)
    return jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, epoch), stream))(keys)


def per_example_normal(keys, shape, dtype=jnp.float32):
    """eps_i ~ N(0, I) of ``shape`` from each example's key: (B, *shape)."""
    return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(keys)


# ----------------------------------------------------------------------------- Gaussian


@dataclasses.dataclass(frozen=True)
class GaussianConfig:
    """Gaussian noise augmentation has no options beyond ``--sigma``."""


def gaussian_loss(cfg: GaussianConfig, params, ctx: Context):
    """Cohen et al. 2019 (``code/train.py``): mean_i CE(f(x_i + sigma eps_i), y_i), eps_i ~ N(0, I),
    noise after the data augmentation, no clipping."""
    eps = per_example_normal(ctx.keys, ctx.x.shape[1:], ctx.x.dtype)
    logits, batch_stats = ctx.apply_fn(params, ctx.batch_stats, ctx.x + ctx.sigma * eps)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, ctx.y)
    return ce.mean(), LossOutput(batch_stats=batch_stats, metrics={"loss": ce.sum()},
                                 correct=jnp.argmax(logits, -1) == ctx.y)


register(Objective("gaussian", GaussianConfig, gaussian_loss,
                   help="cross-entropy on x + sigma * eps (Cohen et al. 2019, code/train.py)"))


# ----------------------------------------------------------------------------- MACER


@dataclasses.dataclass(frozen=True)
class MacerConfig:
    """MACER's options (Zhai et al. 2020; RuntianZ/macer ``main.py`` defaults)."""

    gauss_num: int = option(16, "k: noisy copies of each image per step (MACER --gauss_num)")
    lbd: float = option(12.0, "lambda: weight of the robustness loss (the code uses 12 for every sigma)")
    gamma: float = option(8.0, "hinge: samples with xi > gamma contribute 0 (MACER --gamma)")
    beta: float = option(16.0, "inverse softmax temperature of the robustness term only (MACER --beta)")
    lbd_warmup_epochs: int = option(0, "lambda = 0 for the first E epochs, then --lbd (MACER's code: 0; "
                                       "jh-jeong/smoothing-consistency train_macer.py --deferred: lr_step_size + 1)")

    def __post_init__(self):
        check(self.gauss_num >= 1, f"--gauss-num must be >= 1, got {self.gauss_num}")
        check(self.lbd_warmup_epochs >= 0, f"--lbd-warmup-epochs must be >= 0, got {self.lbd_warmup_epochs}")
        check(self.lbd >= 0, f"--lbd must be >= 0, got {self.lbd}")
        check(self.gamma > 0, f"--gamma must be > 0, got {self.gamma}")
        check(self.beta > 0, f"--beta must be > 0, got {self.beta}")


def macer_terms(logits, y, sigma, *, beta, gamma):
    """MACER's two per-batch sums from the logits ``(B, k, K)`` of the k noisy copies (spec 3.1).

    L_C = sum_i -log(mean_j softmax(z_ij)[y_i] + 1e-10);
    with q_i = mean_j softmax(beta z_ij), top-2 values a_i >= b_i and argmax c_i,
    xi_i = Phi^-1(a_i) - Phi^-1(b_i), kept iff c_i = y_i, xi_i finite and xi_i <= gamma,
    L_R = (sigma / 2) sum_{kept} (gamma - xi_i). Excluded samples see safe arguments in both
    branches (double where), so they give neither NaN values nor NaN gradients.
    Returns (L_C, L_R) as sums over the batch.
    """
    p = jax.nn.softmax(logits, axis=2).mean(axis=1)
    lc = -jnp.log(jnp.take_along_axis(p, y[:, None], axis=1)[:, 0] + 1e-10)
    q = jax.nn.softmax(logits * beta, axis=2).mean(axis=1)
    top, top_idx = jax.lax.top_k(q, 2)
    a, b = top[:, 0], top[:, 1]
    xi_raw = jax.scipy.special.ndtri(jax.lax.stop_gradient(a)) - jax.scipy.special.ndtri(jax.lax.stop_gradient(b))
    keep = (top_idx[:, 0] == y) & jnp.isfinite(xi_raw) & (jnp.abs(xi_raw) <= gamma)
    a_safe = jnp.where(keep, a, 0.75)
    b_safe = jnp.where(keep, b, 0.25)
    xi = jax.scipy.special.ndtri(a_safe) - jax.scipy.special.ndtri(b_safe)
    lr = jnp.where(keep, gamma - xi, 0.0).sum() * sigma / 2
    return lc.sum(), lr, jnp.argmax(p, axis=1) == y


def macer_loss(cfg: MacerConfig, params, ctx: Context):
    """MACER (Zhai et al. 2020, ``macer.py``): the B*k noisy copies (an image's copies adjacent, as
    ``inputs.repeat((1, k, 1, 1))``) through the network in train mode, total (L_C + lambda L_R) / B,
    with lambda = 0 while ``ctx.epoch < cfg.lbd_warmup_epochs`` (L_R is still logged)."""
    b, k = ctx.x.shape[0], cfg.gauss_num
    eps = per_example_normal(ctx.keys, (k,) + ctx.x.shape[1:], ctx.x.dtype)  # (B, k, H, W, C)
    noisy = (ctx.x[:, None] + ctx.sigma * eps).reshape((b * k,) + ctx.x.shape[1:])
    logits, batch_stats = ctx.apply_fn(params, ctx.batch_stats, noisy)
    logits = logits.reshape(b, k, -1)
    lc, lr, correct = macer_terms(logits, ctx.y, ctx.sigma, beta=cfg.beta, gamma=cfg.gamma)
    total = lc + jnp.where(ctx.epoch < cfg.lbd_warmup_epochs, 0.0, cfg.lbd) * lr
    metrics = {"loss": total, "classification_loss": lc, "robustness_loss": lr}
    return total / b, LossOutput(batch_stats=batch_stats, metrics=metrics, correct=correct)


register(Objective("macer", MacerConfig, macer_loss,
                   help="MACER: soft smoothed cross-entropy + lambda * certified-radius hinge (Zhai et al. 2020)"))


__all__ = ["Context", "LossOutput", "Objective", "OBJECTIVES", "register", "get_objective", "example_keys",
           "per_example_normal", "no_example_state", "single_phase", "GaussianConfig", "gaussian_loss",
           "MacerConfig", "macer_loss", "macer_terms", "TRAIN_PURPOSE"]
