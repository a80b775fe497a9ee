"""2x2 stride-2 max pooling with a gather-free gradient.

XLA lowers the gradient of ``lax.reduce_window`` max (``nn.max_pool``) to ``select_and_scatter``,
which XLA:CPU runs as a scalar loop: on LeNet's first pooling layer at batch 1024 it takes about 7x
the layer's convolution (measurements in docs/training.md). This version computes the same function
and the same gradient with reshapes and elementwise operations:

    y[b, i, j, c] = max_{u, v in {0, 1}} x[b, 2i + u, 2j + v, c],
    dx[b, 2i + u, 2j + v, c] = g[b, i, j, c] * [ (u, v) is the first maximiser of the window ]

"first" in row-major window order, which is what ``select_and_scatter`` (XLA) and PyTorch's
``max_pool2d`` do with ties, so gradients agree exactly, ties included (after a ReLU a window of
zeros is a tie).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _windows(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c)


def _window_major(t):
    """(b, h/2, w/2, 4, c): each 2x2 window's elements in row-major order on axis 3."""
    b, h, w, c = t.shape
    return _windows(t).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4, c)


def _first_max_mask(win):
    """bool, the shape of the window-major ``win``: the first maximiser of each window."""
    return jnp.arange(4)[None, None, None, :, None] == jnp.argmax(win, axis=3)[:, :, :, None, :]


@jax.custom_jvp
def max_pool_2x2(x):
    """``nn.max_pool(x, (2, 2), strides=(2, 2))`` for NHWC ``x`` with even H and W.

    JVP rule: the tangent at the first maximiser of each window (linear in the tangent, so forward
    mode works and reverse mode transposes it to the masked broadcast of the cotangent)."""
    return _windows(x).max(axis=(2, 4))


@max_pool_2x2.defjvp
def _jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    win = _window_major(x)
    mask = jax.lax.stop_gradient(_first_max_mask(win))
    return win.max(axis=3), jnp.sum(jnp.where(mask, _window_major(dx), 0), axis=3)
