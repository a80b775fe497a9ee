"""Inference-time BatchNorm folding: the same function, without the BN statistics."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsjax.models import build_model, conv_bn_pairs
from rsjax.models.fold import FoldedModel, fold_bn, fold_variables
from rsjax.models.resnet import Bottleneck, ResNet


def randomized_bn(variables, seed=0):
    """Give every BN non-trivial statistics and affine parameters (init has mean 0, var 1, scale 1,
    bias 0, which would make folding nearly the identity and the test weak)."""
    rng = np.random.default_rng(seed)

    def walk(tree, collection):
        out = {}
        for k, v in tree.items():
            if hasattr(v, "items"):
                out[k] = walk(v, collection)
            elif collection == "batch_stats" and k == "mean":
                out[k] = jnp.asarray(rng.normal(0, 0.3, v.shape), jnp.float32)
            elif collection == "batch_stats" and k == "var":
                out[k] = jnp.asarray(rng.uniform(0.3, 2.5, v.shape), jnp.float32)
            elif collection == "params" and k == "scale":
                out[k] = jnp.asarray(rng.uniform(0.5, 1.5, v.shape), jnp.float32)
            elif collection == "params" and k == "bias":
                out[k] = jnp.asarray(rng.normal(0, 0.2, v.shape), jnp.float32)
            else:
                out[k] = v
        return out

    return {c: walk(t, c) for c, t in variables.items()}


def check_fold(module, shape, seed=0):
    x = jax.random.uniform(jax.random.key(seed), (4,) + shape)
    variables = randomized_bn(module.init(jax.random.key(1), x[:1]), seed)
    folded_model, folded_vars = fold_bn(module, variables)
    ref = np.asarray(jax.jit(module.apply)(variables, x))
    got = np.asarray(jax.jit(folded_model.apply)(folded_vars, x))
    assert np.abs(ref).max() > 0.1  # logits are not trivially small
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    return variables, folded_model, folded_vars


def test_cifar_resnet_folds_exactly():
    module = build_model("cifar_resnet20", 10)
    variables, folded_model, folded_vars = check_fold(module, (32, 32, 3))
    pairs = conv_bn_pairs(variables["params"])
    assert len(pairs) == 1 + 9 * 2 + 2  # stem, 9 blocks x 2, two projection shortcuts
    assert isinstance(folded_model, FoldedModel) and len(folded_model.folded_paths) == len(pairs)
    assert "batch_stats" not in folded_vars  # every BN followed a conv: no statistics remain
    assert set(folded_vars["params"]["bn1"]) == {"bias"}
    # the kernels really were rescaled
    assert not np.allclose(folded_vars["params"]["conv1"]["kernel"], variables["params"]["conv1"]["kernel"])


def test_bottleneck_resnet_folds_exactly():
    # a two-stage torchvision-style bottleneck ResNet (7x7 stem, max pool, conv3/bn3, projections)
    module = partial(ResNet, stage_sizes=(1, 2), block_cls=Bottleneck, num_filters=8, stem="imagenet")(num_classes=7)
    _, _, folded_vars = check_fold(module, (40, 40, 3), seed=3)
    assert set(folded_vars["params"]["layer2_0"]["downsample_bn"]) == {"bias"}


def test_unfolded_model_is_left_untouched():
    module = build_model("cifar_resnet20", 10)
    variables = randomized_bn(module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    before = jax.tree_util.tree_map(np.asarray, variables)
    fold_variables(variables)
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, jax.tree_util.tree_map(np.asarray, variables))


def test_lenet_has_nothing_to_fold():
    module = build_model("lenet", 10)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    m, v = fold_bn(module, variables)
    assert m is module and v is variables


def test_bfloat16_forward_of_folded_model_stays_close():
    module = build_model("cifar_resnet20", 10, dtype=jnp.bfloat16)
    x = jax.random.uniform(jax.random.key(0), (8, 32, 32, 3))
    variables = randomized_bn(build_model("cifar_resnet20", 10).init(jax.random.key(1), x[:1]))
    folded_model, folded_vars = fold_bn(module, variables)
    ref = np.asarray(build_model("cifar_resnet20", 10).apply(variables, x))
    got = np.asarray(folded_model.apply(folded_vars, x), np.float32)
    # bfloat16 has an 8-bit mantissa: agreement to a few percent of the logit scale
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_eps_mismatch_is_refused():
    module = build_model("cifar_resnet20", 10)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    folded_model, folded_vars = fold_bn(module, variables, eps=1e-3)
    with pytest.raises(ValueError, match="epsilon"):
        folded_model.apply(folded_vars, jnp.zeros((1, 32, 32, 3)))
