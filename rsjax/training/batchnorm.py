"""Train-mode BatchNorm in affine form (training on a CPU).

Flax's ``nn.BatchNorm`` in train mode computes, per channel over the N x H x W values,

    mu = E[x],   v = max(0, E[x^2] - mu^2),   y = (x - mu) * (gamma / sqrt(v + eps)) + beta.

:func:`affine_batchnorm` computes the same statistics and running averages and writes the output as

    a = gamma / sqrt(v + eps),   y = (x * a - mu * a) + beta,

which is PyTorch's CPU arithmetic (``batch_norm_cpu_transform_input``: ``alpha = invstd * weight``,
``y = x * alpha + (bias - mean * alpha)``) except that beta is added last: folded into the per-channel
constant, a small beta (a bias a few steps after its zero initialisation) keeps only the bits of it
that survive next to ``mu * a``, which made 3 steps on 4 devices drift from 1 device by 1.9e-4 of a
bias tensor's scale instead of 1.0e-6 (tests/test_onednn_train.py, four devices).

The difference from Flax's form is in what reverse mode keeps: differentiating the first form saves
``x - mu``, a new activation-sized buffer written in the forward pass and read in the backward pass;
the second depends on x only through ``x * a`` and the two sums, so the only saved activation is x
itself, which reverse mode keeps in either form (the derivative of E[x^2] needs it). On a CIFAR ResNet-110 step on XLA:CPU that removes
one write and one read of every BatchNorm input (measured in docs/training.md, "The step on a CPU").
The two forms agree up to float32 rounding (tested against Flax's module: values, gradients, a
forward-mode derivative and the running statistics).

:func:`interceptor` swaps it in for every ``nn.BatchNorm`` call it covers (train mode, batch
statistics over every axis but the last, float32, no mask, no ``axis_name``, not initialising);
anything else runs Flax's module unchanged. Parameters and ``batch_stats`` live under the module's
own names, so checkpoints and exports do not change.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


def affine_batchnorm(x, scale, bias, *, epsilon):
    """``(y, mu, v)``: BatchNorm of ``x`` over every axis but the last (module docstring)."""
    axes = tuple(range(x.ndim - 1))
    mu = x.mean(axes)
    v = jnp.maximum(0.0, (x * x).mean(axes) - mu * mu)
    a = lax.rsqrt(v + epsilon)
    if scale is not None:
        a = a * scale
    y = x * a - mu * a
    if bias is not None:
        y = y + bias
    return y, mu, v


def _covered(mod, args, kwargs) -> bool:
    if type(mod) is not nn.BatchNorm or len(args) != 1 or kwargs:
        return False
    x = args[0]
    return (mod.use_running_average is False and mod.axis in (-1, getattr(x, "ndim", 0) - 1)
            and mod.axis_name is None and mod.use_fast_variance and mod.force_float32_reductions
            and getattr(x, "dtype", None) == jnp.float32 and mod.dtype in (None, jnp.float32)
            and mod.param_dtype == jnp.float32 and not mod.is_initializing())


def interceptor(next_fun, args, kwargs, context):
    """Flax method interceptor: covered ``nn.BatchNorm`` calls compute :func:`affine_batchnorm` and
    Flax's running-average update ``m <- momentum m + (1 - momentum) stat``."""
    mod = context.module
    if context.method_name != "__call__" or not _covered(mod, args, kwargs):
        return next_fun(*args, **kwargs)
    x = args[0]
    c = x.shape[-1]
    ra_mean = mod.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
    ra_var = mod.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
    scale = mod.param("scale", mod.scale_init, (c,), mod.param_dtype) if mod.use_scale else None
    bias = mod.param("bias", mod.bias_init, (c,), mod.param_dtype) if mod.use_bias else None
    y, mu, v = affine_batchnorm(x, scale, bias, epsilon=mod.epsilon)
    ra_mean.value = mod.momentum * ra_mean.value + (1 - mod.momentum) * mu
    ra_var.value = mod.momentum * ra_var.value + (1 - mod.momentum) * v
    return y


__all__ = ["affine_batchnorm", "interceptor"]
