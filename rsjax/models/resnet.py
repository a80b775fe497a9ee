"""ResNets in Flax (linen, NHWC), composed like the Flax ImageNet example.

One :class:`ResNet` module; the architectures are ``functools.partial`` of it:

- ``cifar_resnet{20,32,44,56,110}``: the Cohen / bearpaw CIFAR ResNet (locuslab/smoothing
  ``code/archs/cifar_resnet.py``):
  3x3 stem 3->16 + BN + ReLU, three stages of n BasicBlocks (16/32/64 channels, depth = 6n+2),
  stride 2 on the first block of stages 2 and 3 with a 1x1-conv+BN projection shortcut,
  global average pool, ``fc``.
- ``resnet50``: torchvision ResNet-50 v1.5 (``torchvision.models.resnet50``): 7x7/2 stem + BN + ReLU, 3x3/2 max
  pool (padded with -inf), Bottleneck stages [3, 4, 6, 3] of widths 64/128/256/512 (x4),
  stride on the 3x3 conv2, projection on block 0 of every stage, global average pool, ``fc``.

Padding is always explicit and symmetric, as in PyTorch: a 3x3 conv uses ((1, 1), (1, 1))
for every stride (Flax "SAME" with stride 2 would pad ((0, 1), (0, 1)) and change the numbers),
the 7x7 stem ((3, 3), (3, 3)), 1x1 projections "VALID".

BatchNorm is PyTorch's: eps = 1e-5, momentum 0.1 (Flax momentum 0.9). With ``train=False``
(the default) it uses the running statistics:
``y = (x - mean) / sqrt(var + eps) * scale + bias``.

Variable tree (Flax names mirror the torchvision / Cohen state-dict names):

- ``params/conv1/kernel`` (HWIO), ``params/bn1/{scale,bias}``, ``batch_stats/bn1/{mean,var}``
- block ``b`` of stage ``s`` is the module ``layer{s}_{b}`` containing ``conv1``/``bn1``,
  ``conv2``/``bn2`` (and ``conv3``/``bn3`` in a Bottleneck) and, for a projection shortcut,
  ``downsample_conv``/``downsample_bn`` (torch ``downsample.0``/``downsample.1``);
- ``params/fc/{kernel,bias}`` (kernel is ``[in, out]``).

A fresh initialisation is the references' (:mod:`rsjax.models.init`): convolutions N(0, 2 / fan_out),
``fc`` PyTorch's default U(+-1/sqrt(fan_in)) weight and bias, BatchNorm scale 1 and bias 0.

Every convolution has no bias and is followed by exactly one BatchNorm; the pairs are
``convK`` -> ``bnK`` and ``downsample_conv`` -> ``downsample_bn`` inside the same module
(see :func:`rsjax.models.conv_bn_pairs`), which is what inference-time BN folding needs.
"""

from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from rsjax.models.init import he_fan_out_normal, torch_default_bias, torch_default_kernel

ModuleDef = Any

PAD1 = ((1, 1), (1, 1))
PAD3 = ((3, 3), (3, 3))


class BasicBlock(nn.Module):
    """conv3x3(stride) - BN - ReLU - conv3x3 - BN, plus identity or 1x1-conv+BN projection, ReLU."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    expansion: int = 1

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), (self.strides, self.strides), padding=PAD1, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), padding=PAD1, name="conv2")(y)
        y = self.norm(name="bn2")(y)
        if self.strides != 1 or x.shape[-1] != self.filters * self.expansion:
            residual = self.conv(self.filters * self.expansion, (1, 1), (self.strides, self.strides),
                                 padding="VALID", name="downsample_conv")(x)
            residual = self.norm(name="downsample_bn")(residual)
        return nn.relu(residual + y)


class Bottleneck(nn.Module):
    """torchvision v1.5 bottleneck: 1x1 - BN - ReLU - 3x3(stride) - BN - ReLU - 1x1(x4) - BN, + shortcut, ReLU."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    expansion: int = 4

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (1, 1), padding="VALID", name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), (self.strides, self.strides), padding=PAD1, name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.filters * self.expansion, (1, 1), padding="VALID", name="conv3")(y)
        y = self.norm(name="bn3")(y)
        if self.strides != 1 or x.shape[-1] != self.filters * self.expansion:
            residual = self.conv(self.filters * self.expansion, (1, 1), (self.strides, self.strides),
                                 padding="VALID", name="downsample_conv")(x)
            residual = self.norm(name="downsample_bn")(residual)
        return nn.relu(residual + y)


# the blocks whose output is a residual sum (rsjax.kernels.onednn_train.train_interceptor)
RESIDUAL_BLOCKS = (BasicBlock, Bottleneck)


class ResNet(nn.Module):
    """ResNet on already-normalised NHWC input; returns logits ``(B, num_classes)``.

    stem="cifar": conv3x3/1 -> BN -> ReLU (no pool). stem="imagenet": conv7x7/2 -> BN -> ReLU ->
    maxpool 3x3/2 pad 1 (-inf). Stage ``i`` has width ``num_filters * 2**i`` and stride 2 on its
    first block for ``i > 0``.
    """

    stage_sizes: Sequence[int]
    block_cls: Callable
    num_classes: int
    num_filters: int = 64
    stem: str = "imagenet"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=he_fan_out_normal)
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       dtype=self.dtype)
        x = jnp.asarray(x, self.dtype)
        if self.stem == "cifar":
            x = conv(self.num_filters, (3, 3), padding=PAD1, name="conv1")(x)
            x = nn.relu(norm(name="bn1")(x))
        elif self.stem == "imagenet":
            x = conv(self.num_filters, (7, 7), (2, 2), padding=PAD3, name="conv1")(x)
            x = nn.relu(norm(name="bn1")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=PAD1)  # pads with -inf
        else:
            raise ValueError(f"unknown stem {self.stem!r}")
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = 2 if i > 0 and j == 0 else 1
                x = self.block_cls(self.num_filters * 2 ** i, conv=conv, norm=norm, strides=strides,
                                   name=f"layer{i + 1}_{j}")(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=torch_default_kernel,
                        bias_init=torch_default_bias(x.shape[-1]), name="fc")(x)


cifar_resnet20 = partial(ResNet, stage_sizes=(3, 3, 3), block_cls=BasicBlock, num_filters=16, stem="cifar")
cifar_resnet32 = partial(ResNet, stage_sizes=(5, 5, 5), block_cls=BasicBlock, num_filters=16, stem="cifar")
cifar_resnet44 = partial(ResNet, stage_sizes=(7, 7, 7), block_cls=BasicBlock, num_filters=16, stem="cifar")
cifar_resnet56 = partial(ResNet, stage_sizes=(9, 9, 9), block_cls=BasicBlock, num_filters=16, stem="cifar")
cifar_resnet110 = partial(ResNet, stage_sizes=(18, 18, 18), block_cls=BasicBlock, num_filters=16, stem="cifar")
resnet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck, num_filters=64, stem="imagenet")
