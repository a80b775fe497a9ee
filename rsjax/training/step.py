"""The train state, the optimiser and the jitted data-parallel train step.

**State** (:class:`TrainState`, a pytree): ``params``, ``batch_stats`` (BatchNorm running
averages), ``opt_state`` (optax), ``example_state`` (the objective's per-example tables, see
:mod:`rsjax.training.objectives`), ``sums`` (the running per-epoch metric sums) and ``step``
(optimiser steps done). Everything the run needs to continue is in it; the input pipeline's
position is ``step`` (:mod:`rsjax.training.data`), and the noise is a function of
(seed, dataset index, epoch), so a restored state continues the run bit for bit.

**Optimiser**: PyTorch's ``SGD(lr, momentum, weight_decay)`` exactly:
``g <- grad + wd * p`` on every parameter, ``buf <- momentum * buf + g`` (``buf`` = g at the
first step), ``p <- p - lr_t * buf``, i.e. ``optax.chain(add_decayed_weights(wd),
sgd(schedule, momentum))`` with the learning rate a function of the epoch
(:func:`lr_at_epoch`).

**BatchNorm**: Flax's BatchNorm (momentum 0.9 = PyTorch 0.1) updates the running variance with
the biased batch variance ``v_b``; PyTorch uses the unbiased ``v_b * n / (n - 1)`` (n = elements
per channel: batch x H x W). :func:`train_apply` rescales the update of every running variance
accordingly, so the running averages, and thus an exported model's eval-mode function, are
PyTorch's. Statistics are over the global batch (the step is one program over the whole
batch); PyTorch's DataParallel computes them per GPU.

**Data parallelism**: :func:`make_train_step` jits the step over a 1-D mesh with axis
``"data"``: the batch and the per-example tables are sharded along it
(``NamedSharding(mesh, P("data"))``), the rest replicated; the state is donated. XLA inserts the
gradient all-reduce. The same program runs on one device or many, on one host or several.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rsjax.training.objectives import Context, example_keys

DATA_AXIS = "data"
BN_MOMENTUM = 0.9  # Flax convention; PyTorch momentum 0.1


@flax.struct.dataclass
class TrainState:
    params: Any
    batch_stats: Any
    opt_state: Any
    example_state: Any
    sums: Any
    step: Any


# ----------------------------------------------------------------------------- schedule / optimiser


def lr_at_epoch(epoch, *, lr: float, schedule: str, gamma: float, epochs: int):
    """The learning rate of 0-based ``epoch`` (works on ints and traced int arrays).

    ``step:S``: ``lr * gamma ** (epoch // S)`` (PyTorch ``StepLR(S, gamma)`` stepped with the epoch
    at the start of each epoch, as Cohen's ``train.py``); ``multistep:E1,E2,...``: multiplied by gamma
    from each 0-based epoch E on (MACER's ``MultiStepLR([200, 400])`` stepped before each 1-based
    epoch is ``multistep:199,399``); ``constant``; ``cosine``: ``lr (1 + cos(pi epoch / epochs)) / 2``.
    """
    kind, _, arg = schedule.partition(":")
    e = jnp.asarray(epoch, jnp.float32)
    if kind == "constant":
        return jnp.asarray(lr, jnp.float32)
    if kind == "step":
        return lr * jnp.power(jnp.float32(gamma), jnp.floor(e / int(arg)))
    if kind == "multistep":
        k = sum((e >= int(m)).astype(jnp.float32) for m in arg.split(","))
        return lr * jnp.power(jnp.float32(gamma), k)
    if kind == "cosine":
        return lr * (1 + jnp.cos(jnp.pi * e / epochs)) / 2
    raise ValueError(f"unknown lr schedule {schedule!r}")


def parse_schedule(schedule: str):
    """Validate a schedule string (RsjaxError naming the problem)."""
    from rsjax.errors import RsjaxError

    kind, _, arg = schedule.partition(":")
    try:
        if kind == "step" and int(arg) >= 1:
            return schedule
        if kind == "multistep" and all(int(m) >= 0 for m in arg.split(",")):
            return schedule
        if kind in ("constant", "cosine") and not arg:
            return schedule
    except ValueError:
        pass
    raise RsjaxError(f"--lr-schedule {schedule!r}: expected step:S, multistep:E1,E2,..., constant or cosine")


def make_optimizer(*, lr, schedule, gamma, epochs, steps_per_epoch, momentum, weight_decay):
    """PyTorch SGD with momentum and weight decay on every parameter (module doc)."""

    def sched(count):
        return lr_at_epoch(count // steps_per_epoch, lr=lr, schedule=schedule, gamma=gamma, epochs=epochs)

    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(sched, momentum=momentum if momentum > 0 else None))


# ----------------------------------------------------------------------------- network in train mode


def _bn_sizes(intermediates):
    """{module path: elements per channel} of every BatchNorm call captured in ``intermediates``."""
    out = {}

    def walk(tree, path):
        for k, v in tree.items():
            if k == "__call__":
                out[path] = int(np.prod(v[0].shape[:-1]))
            elif isinstance(v, dict) or hasattr(v, "items"):
                walk(v, path + (k,))

    walk(intermediates, ())
    return out


def unbiased_running_var(old_stats, new_stats, sizes):
    """PyTorch's running variance from Flax's: ``new + (new - m * old) / (n - 1)`` per BatchNorm."""

    def fix(path, old, new):
        names = tuple(getattr(p, "key", p) for p in path)
        if names[-1] != "var":
            return new
        n = sizes[names[:-1]]
        return new + (new - BN_MOMENTUM * old) / max(n - 1, 1)

    return jax.tree_util.tree_map_with_path(fix, old_stats, new_stats)


def train_apply(model, mean, std, params, batch_stats, x, *, onednn=False, mesh=None):
    """logits of the network in train mode on ``(x - mean) / std``, and PyTorch-style running averages.

    ``onednn``: the convolutions and their gradients run in oneDNN
    (:mod:`rsjax.kernels.onednn_train`; per device on its shard of ``mesh``'s batch). Otherwise, on
    a CPU backend, XLA's convolutions with the weight gradients summed over batch chunks
    (:mod:`rsjax.models.conv_grad`: the same gradient up to summation order, faster on XLA:CPU for
    large batches such as MACER's B x k copies). On a CPU backend BatchNorm is computed in affine
    form (:mod:`rsjax.training.batchnorm`: the same function up to rounding, one saved activation
    fewer)."""
    import flax.linen as nn

    if onednn:
        from rsjax.kernels.onednn_train import train_interceptor

        kernels = train_interceptor(mesh)
    elif jax.default_backend() == "cpu":
        from rsjax.models.conv_grad import chunked_conv_interceptor

        kernels = chunked_conv_interceptor()
    else:
        return _train_apply(model, mean, std, params, batch_stats, x)
    from rsjax.training import batchnorm

    with nn.intercept_methods(batchnorm.interceptor), nn.intercept_methods(kernels):
        return _train_apply(model, mean, std, params, batch_stats, x)


def _train_apply(model, mean, std, params, batch_stats, x):
    x = (x - mean) / std
    if not batch_stats:
        return model.apply({"params": params}, x, train=True), batch_stats
    is_bn = lambda mdl, name: type(mdl).__name__ == "BatchNorm" and name == "__call__"  # noqa: E731
    logits, upd = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                              mutable=["batch_stats", "intermediates"], capture_intermediates=is_bn)
    sizes = _bn_sizes(jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), upd["intermediates"]))
    return logits, unbiased_running_var(batch_stats, upd["batch_stats"], sizes)


def eval_apply(model, mean, std, params, batch_stats, x):
    variables = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
    return model.apply(variables, (x - mean) / std, train=False)


# ----------------------------------------------------------------------------- the step


def batch_sharding(mesh: Mesh):
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh):
    return NamedSharding(mesh, P())


def state_shardings(mesh: Mesh, state: TrainState):
    rep, shard = replicated(mesh), batch_sharding(mesh)
    return TrainState(params=jax.tree_util.tree_map(lambda _: rep, state.params),
                      batch_stats=jax.tree_util.tree_map(lambda _: rep, state.batch_stats),
                      opt_state=jax.tree_util.tree_map(lambda _: rep, state.opt_state),
                      example_state=jax.tree_util.tree_map(lambda _: shard, state.example_state),
                      sums=jax.tree_util.tree_map(lambda _: rep, state.sums),
                      step=rep)


def step_fn(objective, cfg, tx, apply_fn, *, seed: int, sigma: float, num_classes: int, phase: int,
            state: TrainState, batch: dict, epoch):
    """One optimiser step on a global batch (pure; :func:`make_train_step` jits it).

    ``batch``: ``x`` float32 (B, H, W, C) in [0, 1], ``y``, ``idx``, ``row`` int32 (B,).
    Returns (new state, the batch's metric sums).
    """
    keys = example_keys(seed, batch["idx"], epoch)
    rows = jax.tree_util.tree_map(lambda a: a[batch["row"]], state.example_state)
    ctx = Context(x=batch["x"], y=batch["y"], idx=batch["idx"], row=batch["row"], keys=keys, example_state=rows,
                  batch_stats=state.batch_stats, sigma=jnp.float32(sigma), epoch=jnp.asarray(epoch, jnp.int32),
                  step=state.step, apply_fn=apply_fn, phase=phase, num_classes=num_classes)
    (_, out), grads = jax.value_and_grad(lambda p: objective.loss(cfg, p, ctx), has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    example_state = state.example_state
    if out.example_state is not None:
        example_state = jax.tree_util.tree_map(lambda a, r: a.at[batch["row"]].set(r.astype(a.dtype)),
                                               state.example_state, out.example_state)
    batch_sums = dict(out.metrics, correct=out.correct.sum().astype(jnp.float32),
                      examples=jnp.float32(batch["y"].shape[0]))
    batch_sums = {k: jnp.asarray(v, jnp.float32) for k, v in batch_sums.items()}
    sums = {k: state.sums[k] + batch_sums[k] for k in state.sums}
    new = TrainState(params=params, batch_stats=out.batch_stats, opt_state=opt_state,
                     example_state=example_state, sums=sums, step=state.step + 1)
    return new, batch_sums


def metric_names(objective, cfg, apply_fn, *, num_classes, x_shape, example_state, params, batch_stats):
    """The names of the metric sums the objective returns (traced abstractly, nothing runs)."""
    b = x_shape[0]

    def run(params, batch_stats, example_state):
        rows = jax.tree_util.tree_map(lambda a: a[:b], example_state)
        ctx = Context(x=jnp.zeros(x_shape), y=jnp.zeros((b,), jnp.int32), idx=jnp.arange(b, dtype=jnp.int32),
                      row=jnp.arange(b, dtype=jnp.int32), keys=example_keys(0, jnp.arange(b), 0),
                      example_state=rows, batch_stats=batch_stats, sigma=jnp.float32(0.25),
                      epoch=jnp.int32(0), step=jnp.int32(0), apply_fn=apply_fn, num_classes=num_classes)
        return objective.loss(cfg, params, ctx)[1].metrics

    names = sorted(jax.eval_shape(run, params, batch_stats, example_state))
    if "loss" not in names:
        raise ValueError(f"objective {objective.name!r} returns no 'loss' metric")
    return names + ["correct", "examples"]


def zero_sums(names):
    return {k: jnp.zeros((), jnp.float32) for k in names}


def make_train_step(objective, cfg, tx, apply_fn, mesh: Mesh, state: TrainState, *, seed, sigma,
                    num_classes):
    """``train_step(state, batch, epoch, phase) -> (state, batch_sums)``, jitted over ``mesh``
    (module doc); one compilation per phase (and per batch size: a short last batch)."""
    s_shard = state_shardings(mesh, state)
    b_shard = batch_sharding(mesh)
    rep = replicated(mesh)
    compiled = {}

    def train_step(state, batch, epoch, phase=0):
        if phase not in compiled:
            fn = functools.partial(step_fn, objective, cfg, tx, apply_fn, seed=seed, sigma=sigma,
                                   num_classes=num_classes, phase=phase)
            compiled[phase] = jax.jit(lambda st, b, e: fn(state=st, batch=b, epoch=e),
                                      in_shardings=(s_shard, b_shard, rep), out_shardings=(s_shard, rep),
                                      donate_argnums=(0,))
        return compiled[phase](state, batch, epoch)

    return train_step


def make_eval_step(apply_eval, mesh: Mesh, *, seed: int, sigma: float):
    """``eval_step(params, batch_stats, batch, epoch) -> (loss sum, correct sum)``: Cohen's test loop,
    cross-entropy and accuracy in eval mode under one Gaussian draw per image (stream 1 of the
    examples' "train" keys, so it never repeats a training draw)."""
    rep, b_shard = replicated(mesh), batch_sharding(mesh)

    @functools.partial(jax.jit, in_shardings=(rep, rep, b_shard, rep), out_shardings=rep)
    def eval_step(params, batch_stats, batch, epoch):
        keys = example_keys(seed, batch["idx"], epoch, stream=1)
        eps = jax.vmap(lambda k: jax.random.normal(k, batch["x"].shape[1:]))(keys)
        logits = apply_eval(params, batch_stats, batch["x"] + sigma * eps)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        valid = batch["valid"]
        return (ce * valid).sum(), ((jnp.argmax(logits, -1) == batch["y"]) * valid).sum()

    return eval_step
