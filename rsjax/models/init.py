"""The reference networks' initialisations as Flax initialisers.

A model that ``rsjax train`` starts from scratch draws its weights from the same distributions as
the PyTorch network it ports, so that training starts where the references' does (the
distributions, not the numbers: the draws come from JAX's PRNG).

- PyTorch's default for ``nn.Conv2d`` and ``nn.Linear`` (``reset_parameters``, torch 2.x):
  the weight is ``kaiming_uniform_(a=sqrt(5))``, i.e. ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
  (gain sqrt(2 / (1 + a^2)) = sqrt(1/3), bound sqrt(3) * gain / sqrt(fan_in)), and the bias is
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; fan_in = in_channels * kh * kw (conv) or in_features.
  The MNIST LeNet (MACER ``model.py``) uses these everywhere, the ResNets for ``fc``.
- The ResNets' convolutions (Cohen ``code/archs/cifar_resnet.py`` and MACER ``model.py``:
  ``normal_(0, sqrt(2 / n))`` with n = kh * kw * out_channels; torchvision ResNet-50:
  ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, the same law):
  ``N(0, 2 / fan_out)``, untruncated. BatchNorm: scale 1, bias 0 (Flax's defaults, and theirs).

Flax's own defaults differ (``lecun_normal``: truncated normal of variance 1 / fan_in, zero biases):
three times the variance of PyTorch's default weights in every LeNet layer.
"""

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

# U(-1/sqrt(fan_in), 1/sqrt(fan_in)): variance_scaling's "uniform" has bound sqrt(3 * scale / fan_in).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# N(0, 2 / fan_out), fan_out = kh * kw * out_channels for an HWIO kernel.
he_fan_out_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_default_bias(fan_in: int):
    """PyTorch's default bias law for a layer with ``fan_in`` inputs: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


__all__ = ["torch_default_kernel", "he_fan_out_normal", "torch_default_bias"]
