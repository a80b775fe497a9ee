"""The MNIST LeNet of the shared ``mnist_lenet_noise0.25`` checkpoint, in Flax (NHWC).

conv1 5x5 (1->20, bias, VALID) - ReLU - maxpool 2 - conv2 5x5 (20->50, bias, VALID) - ReLU -
maxpool 2 - flatten in PyTorch's (C, H, W) order (50*4*4 = 800) - fc1 (800->500) - ReLU - fc2.

Variable tree: ``params/{conv1,conv2}/{kernel (HWIO), bias}``, ``params/{fc1,fc2}/{kernel ([in, out]),
bias}``; no BatchNorm, so there is no ``batch_stats`` collection. The flatten transposes the
NHWC map to NCHW first, so ``fc1/kernel`` is exactly the transposed PyTorch ``fc1.weight``.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from rsjax.models.pool import max_pool_2x2


class LeNet(nn.Module):
    """LeNet on (B, 28, 28, 1) input; returns logits (B, num_classes). ``train`` is accepted and unused."""

    num_classes: int = 10
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jnp.asarray(x, self.dtype)
        x = nn.relu(nn.Conv(20, (5, 5), padding="VALID", dtype=self.dtype, name="conv1")(x))
        x = max_pool_2x2(x)
        x = nn.relu(nn.Conv(50, (5, 5), padding="VALID", dtype=self.dtype, name="conv2")(x))
        x = max_pool_2x2(x)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # PyTorch (C, H, W) flatten order
        x = nn.relu(nn.Dense(500, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc2")(x)


lenet = LeNet
