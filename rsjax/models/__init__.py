"""Flax models of the smoothing base classifiers (NHWC, ``__call__(x, train=False)``).

``ARCHS`` maps an architecture name to an :class:`Arch` (``build``, ``input_shape`` [H, W, C],
``dataset``: the default dataset);
``build_model(arch, num_classes)`` returns the Flax module. Models take *already normalised*
input; the dataset normalisation of a converted model is applied by
:func:`rsjax.classifier.load_classifier`.

Tree naming (see rsjax.models.resnet / rsjax.models.lenet): Flax module names mirror the
PyTorch state-dict names with ``.`` -> ``_`` for block indices (``layer2_0`` = ``layer2.0``);
``downsample_conv`` / ``downsample_bn`` = ``downsample.0`` / ``downsample.1``. Conv kernels are
HWIO, Dense kernels ``[in, out]``; BN ``scale``/``bias`` live in ``params``, ``mean``/``var`` in
``batch_stats``. :func:`conv_bn_pairs` lists every (conv, following BN) pair.
"""

from typing import Callable, NamedTuple

import jax.numpy as jnp

from rsjax.errors import RsjaxError
from rsjax.models import lenet as _lenet
from rsjax.models import resnet as _resnet



class Arch(NamedTuple):
    """An architecture: ``build(num_classes=, dtype=)`` gives the Flax module."""

    build: Callable
    input_shape: tuple  # [H, W, C]
    dataset: str  # the dataset it is usually trained on (the converter's default)


ARCHS = {
    "cifar_resnet20": Arch(_resnet.cifar_resnet20, (32, 32, 3), "cifar10"),
    "cifar_resnet32": Arch(_resnet.cifar_resnet32, (32, 32, 3), "cifar10"),
    "cifar_resnet44": Arch(_resnet.cifar_resnet44, (32, 32, 3), "cifar10"),
    "cifar_resnet56": Arch(_resnet.cifar_resnet56, (32, 32, 3), "cifar10"),
    "cifar_resnet110": Arch(_resnet.cifar_resnet110, (32, 32, 3), "cifar10"),
    "resnet50": Arch(_resnet.resnet50, (224, 224, 3), "imagenet"),
    "lenet": Arch(_lenet.lenet, (28, 28, 1), "mnist"),
}


def build_model(arch: str, num_classes: int, dtype=jnp.float32):
    """The Flax module for ``arch`` with ``num_classes`` outputs, computing in ``dtype``."""
    if arch not in ARCHS:
        raise RsjaxError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    return ARCHS[arch].build(num_classes=num_classes, dtype=dtype)


def input_shape(arch: str):
    """The [H, W, C] input shape of ``arch``."""
    return tuple(ARCHS[arch].input_shape)


def conv_bn_pairs(params):
    """All (conv path, BN path) pairs of a ResNet ``params`` tree, as tuples of module names.

    A pair is ``convK`` -> ``bnK`` or ``downsample_conv`` -> ``downsample_bn`` inside the same
    module; the BN directly follows the conv in the forward pass. LeNet has none.
    """
    pairs = []

    def walk(tree, prefix):
        for name, sub in tree.items():
            if not isinstance(sub, dict):
                continue
            bn = None
            if name.startswith("conv") and name[4:].isdigit():
                bn = "bn" + name[4:]
            elif name == "downsample_conv":
                bn = "downsample_bn"
            if bn is not None and bn in tree:
                pairs.append((prefix + (name,), prefix + (bn,)))
            elif "kernel" not in sub:
                walk(sub, prefix + (name,))

    walk(params, ())
    return pairs


__all__ = ["ARCHS", "build_model", "input_shape", "conv_bn_pairs"]
