"""Convolutions whose weight gradient is summed over batch chunks (training on XLA:CPU).

For a convolution y = conv(x, W) the weight gradient is a sum over the batch,

    dL/dW = sum_b conv_dW(x_b, g_b),      g = dL/dy,

so it may be computed on chunks of the batch and added. XLA:CPU's weight-gradient convolution
loses efficiency as the batch grows (measured in docs/training.md: about 3x slower per image at a
batch of 1024 than at 64 on ResNet-20's 3x3 layers), and MACER's B x k noisy copies make every
training batch large. :func:`chunked_conv` computes the forward and the input gradient over the
whole batch as usual and the weight gradient chunk by chunk (an unrolled sum, so each chunk is an
ordinary convolution that XLA compiles with its fast path; chunks are strided through the batch,
so a data-sharded batch keeps every chunk on all devices). The result is the same gradient up to
float32 summation order.

:func:`chunked_conv_interceptor` routes the ``nn.Conv`` layers of a model to it (a Flax method
interceptor; the model code is untouched), as :mod:`rsjax.models.pack` does for inference.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# batches up to this size are one chunk; larger ones are cut into chunks of this size
CHUNK = 64


def _conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DIMENSION_NUMBERS)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def chunked_conv(x, w, strides, padding, chunk):
    """``lax.conv_general_dilated(x, w, strides, padding)`` in NHWC/HWIO whose weight gradient is
    the sum of the gradients of batch chunks of about ``chunk`` examples (module doc).

    Written as a JVP rule, tangent = conv(dx, w) + stack_c conv(x_c, dw): linear in (dx, dw), so
    forward mode works as it is and reverse mode (JAX transposes the rule) computes the input
    gradient over the whole batch and the weight gradient as sum_c conv_dW(x_c, g_c)."""
    return _conv(x, w, strides, padding)


@chunked_conv.defjvp
def _jvp(strides, padding, chunk, primals, tangents):
    x, w = primals
    dx, dw = tangents
    y = _conv(x, w, strides, padding)
    return y, _conv(dx, w, strides, padding) + _per_chunk(x, lambda xs: _conv(xs, dw, strides, padding), chunk)


def _per_chunk(x, fn, chunk):
    """``fn`` applied to batch chunks of ``x`` of at most about ``chunk`` examples, outputs put back
    in batch order.

    When n chunks (n >= B / chunk, n <= twice that) divide B, chunk j is the strided set
    {j, n + j, 2n + j, ...}: a batch sharded in contiguous blocks over devices then keeps each
    chunk spread over all devices, with no data movement; otherwise contiguous slices."""
    b = x.shape[0]
    need = -(-b // chunk)
    n = next((k for k in range(need, 2 * need + 1) if b % k == 0), None)
    if n is None:
        return jnp.concatenate([fn(x[lo:lo + chunk]) for lo in range(0, b, chunk)])
    xr = x.reshape((b // n, n) + x.shape[1:])
    out = jnp.stack([fn(xr[:, j]) for j in range(n)], axis=1)
    return out.reshape((b,) + out.shape[2:])


def _padding(mod, kernel_size):
    p = mod.padding
    if isinstance(p, str):
        return p if p in ("SAME", "VALID") else None
    if isinstance(p, int):
        return ((p, p),) * len(kernel_size)
    try:
        pairs = tuple((q, q) if isinstance(q, int) else tuple(q) for q in p)
    except TypeError:
        return None
    return pairs if len(pairs) == len(kernel_size) and all(len(q) == 2 for q in pairs) else None


def chunked_conv_interceptor(chunk: int = CHUNK):
    """Flax method interceptor: a plain 2-D ``nn.Conv`` (no dilation, one feature group) applied to
    a batch larger than ``chunk`` computes :func:`chunked_conv` with the module's own kernel and
    bias; everything else runs unchanged."""

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if (context.method_name != "__call__" or not isinstance(mod, nn.Conv) or len(args) != 1 or kwargs
                or getattr(args[0], "ndim", 0) != 4 or args[0].shape[0] <= chunk):
            return next_fun(*args, **kwargs)
        ks = tuple(mod.kernel_size)
        padding = _padding(mod, ks)
        plain = (len(ks) == 2 and mod.feature_group_count == 1 and mod.input_dilation in (None, 1)
                 and mod.kernel_dilation in (None, 1) and padding is not None and mod.mask is None)
        if not plain:
            return next_fun(*args, **kwargs)
        strides = mod.strides or 1
        strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
        x = args[0]
        kernel = mod.get_variable("params", "kernel")
        dtype = mod.dtype or jnp.result_type(x, kernel)
        y = chunked_conv(x.astype(dtype), kernel.astype(dtype), strides, padding, chunk)
        if mod.use_bias:
            y = y + mod.get_variable("params", "bias").astype(dtype)
        return y

    return interceptor
