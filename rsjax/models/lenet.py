"""The MNIST LeNet of the shared ``mnist_lenet_noise0.25`` checkpoint, in Flax (NHWC).

conv1 5x5 (1->20, bias, VALID) - ReLU - maxpool 2 - conv2 5x5 (20->50, bias, VALID) - ReLU -
maxpool 2 - flatten in PyTorch's (C, H, W) order (50*4*4 = 800) - fc1 (800->500) - ReLU - fc2.

Variable tree: ``params/{conv1,conv2}/{kernel (HWIO), bias}``, ``params/{fc1,fc2}/{kernel ([in, out]),
bias}``; no BatchNorm, so there is no ``batch_stats`` collection. The flatten transposes the
NHWC map to NCHW first, so ``fc1/kernel`` is exactly the transposed PyTorch ``fc1.weight``.
A fresh initialisation is PyTorch's default for every layer (:mod:`rsjax.models.init`).
"""

from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from rsjax.models.init import torch_default_bias, torch_default_kernel
from rsjax.models.pool import max_pool_2x2


class LeNet(nn.Module):
    """LeNet on (B, 28, 28, 1) input; returns logits (B, num_classes). ``train`` is accepted and unused."""

    num_classes: int = 10
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        # PyTorch's default Conv2d / Linear initialisation (rsjax.models.init), bias bound 1/sqrt(fan_in).
        conv = partial(nn.Conv, padding="VALID", dtype=self.dtype, kernel_init=torch_default_kernel)
        dense = partial(nn.Dense, dtype=self.dtype, kernel_init=torch_default_kernel)
        x = jnp.asarray(x, self.dtype)
        x = nn.relu(conv(20, (5, 5), bias_init=torch_default_bias(25 * x.shape[-1]), name="conv1")(x))
        x = max_pool_2x2(x)
        x = nn.relu(conv(50, (5, 5), bias_init=torch_default_bias(25 * x.shape[-1]), name="conv2")(x))
        x = max_pool_2x2(x)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # PyTorch (C, H, W) flatten order
        x = nn.relu(dense(500, bias_init=torch_default_bias(x.shape[-1]), name="fc1")(x))
        return dense(self.num_classes, bias_init=torch_default_bias(x.shape[-1]), name="fc2")(x)


lenet = LeNet
