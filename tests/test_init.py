"""A fresh rsjax model draws every tensor from the law of the reference PyTorch network's
initialisation (rsjax.models.init): each leaf against the same leaf of a freshly built reference
(converters.torch_reference, whose inits are Cohen's / MACER's / torchvision's) by a two-sample
Kolmogorov-Smirnov test, and constants exactly. Negative control: Flax's default initialisers
(lecun_normal kernels, zero biases), which rsjax used before, are rejected by the same test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from flax import traverse_util
from scipy.stats import ks_2samp

from converters.pytorch import _to_flax_layout, flax_path_to_torch_key
from converters.torch_reference import build_net
from rsjax.models import build_model

# ResNet-50's parameter shapes do not depend on the image size; 64x64 keeps its init cheap.
SHAPES = {"lenet": (28, 28, 1), "cifar_resnet20": (32, 32, 3), "resnet50": (64, 64, 3)}
P_MIN = 1e-4  # per leaf; about 60 leaves per model, fixed seeds


def _pairs(arch, seed=0):
    """(path, rsjax leaf, reference leaf in the Flax layout) for every parameter."""
    model = build_model(arch, 10)
    variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + SHAPES[arch]))
    torch.manual_seed(seed)
    state = build_net(arch, 10).state_dict()
    for path, leaf in traverse_util.flatten_dict(variables["params"]).items():
        ref = _to_flax_layout(state[flax_path_to_torch_key(("params",) + path)].numpy(), path[-1])
        yield path, np.asarray(leaf), np.asarray(ref)


@pytest.mark.parametrize("arch", sorted(SHAPES))
def test_fresh_init_has_the_reference_law(arch):
    n_random = 0
    pairs = list(_pairs(arch))
    kernels = {path[:-1]: ours for path, ours, _ in pairs if path[-1] == "kernel"}
    for path, ours, ref in pairs:
        assert ours.shape == ref.shape, path
        if np.ptp(ref) == 0:  # BatchNorm scale 1 / bias 0
            np.testing.assert_array_equal(ours, ref, err_msg=str(path))
            continue
        n_random += 1
        p = ks_2samp(ours.ravel(), ref.ravel()).pvalue
        assert p > P_MIN, (path, p, ours.std(), ref.std())
        if arch == "lenet" or path[-2] == "fc":
            # PyTorch's default, weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with the fan_in of the
            # layer's kernel: the bound is reached (max |w| >= bound / 2 fails with probability 2^-size), and
            # never passed. This has the power on the small biases (10-50 values) that the KS test lacks.
            kernel = kernels[path[:-1]]
            bound = 1 / np.sqrt(kernel.size // kernel.shape[-1])
            assert bound / 2 <= np.abs(ours).max() <= bound, (path, np.abs(ours).max(), bound)
    assert n_random >= 4


@pytest.mark.parametrize("arch", ["lenet", "cifar_resnet20"])
def test_negative_control_flax_default_init_is_rejected(arch):
    """The KS test above has the power to see Flax's defaults: every LeNet tensor of at least 500
    values (kernels, fc1's bias), and every ResNet convolution with as many inputs as outputs (where
    lecun_normal's variance 1 / (9 c) is half of 2 / (9 c)), fails it. (Smaller biases are covered by
    the bound check above, which zero biases fail.)"""
    key = jax.random.PRNGKey(1)
    rejected = checked = 0
    for path, ours, ref in _pairs(arch):
        if np.ptp(ref) == 0 or ours.size < 500:
            continue
        if path[-1] == "kernel" and ours.ndim == 4 and arch != "lenet" and ours.shape[-1] != ours.shape[-2]:
            continue
        key, sub = jax.random.split(key)
        flax_default = (nn.initializers.lecun_normal()(sub, ours.shape) if path[-1] == "kernel"
                        else jnp.zeros(ours.shape))
        checked += 1
        rejected += ks_2samp(np.asarray(flax_default).ravel(), ref.ravel()).pvalue < P_MIN
    assert checked >= 4 and rejected == checked
