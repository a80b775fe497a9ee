"""Flax model definitions: registry, parameter counts against the PyTorch references,
tree naming (conv/BN pairs), output shapes, training-mode BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsjax.errors import RsjaxError
from rsjax.models import ARCHS, build_model, conv_bn_pairs, input_shape

# parameters (trainable) and BN layers of each architecture; ResNet-110 / 20 / 50 counts are
# the published ones (1,730,714 / 272,474 / 25,557,032).
EXPECTED = {"cifar_resnet20": (272_474, 21), "cifar_resnet110": (1_730_714, 111),
            "resnet50": (25_557_032, 53), "lenet": (431_080, 0)}


def _abstract(arch, num_classes):
    model = build_model(arch, num_classes)
    return model, jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2,) + input_shape(arch))))


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_parameter_counts_and_conv_bn_pairs(arch):
    num_classes = 1000 if arch == "resnet50" else 10
    _, v = _abstract(arch, num_classes)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(v["params"]))
    pairs = conv_bn_pairs(v["params"])
    assert (n_params, len(pairs)) == EXPECTED[arch]
    for conv, bn in pairs:  # every conv is bias-free and feeds a BN of its width
        c, b = v["params"], v["params"]
        for name in conv:
            c = c[name]
        for name in bn:
            b = b[name]
        assert set(c) == {"kernel"} and set(b) == {"scale", "bias"}
        assert c["kernel"].shape[-1] == b["scale"].shape[0]
        s = v["batch_stats"]
        for name in bn:
            s = s[name]
        assert set(s) == {"mean", "var"}
    if pairs:
        assert sum(1 for _ in jax.tree_util.tree_leaves(v["batch_stats"])) == 2 * len(pairs)


def test_tree_names_mirror_torch():
    _, v = _abstract("cifar_resnet110", 10)
    p = v["params"]
    assert p["conv1"]["kernel"].shape == (3, 3, 3, 16)
    assert p["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 16, 32)
    assert "downsample_conv" not in p["layer2_1"] and "downsample_conv" not in p["layer1_0"]
    assert p["layer3_17"]["conv2"]["kernel"].shape == (3, 3, 64, 64)
    assert p["fc"]["kernel"].shape == (64, 10)
    _, v = _abstract("resnet50", 1000)
    p = v["params"]
    assert p["conv1"]["kernel"].shape == (7, 7, 3, 64)
    assert p["layer1_0"]["downsample_conv"]["kernel"].shape == (1, 1, 64, 256)  # stride 1, 64 -> 256
    assert p["layer4_2"]["conv3"]["kernel"].shape == (1, 1, 512, 2048)
    assert p["fc"]["kernel"].shape == (2048, 1000)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_output_shapes(arch):
    model, v = _abstract(arch, 7)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), v, jax.ShapeDtypeStruct((3,) + input_shape(arch), jnp.float32))
    assert out.shape == (3, 7) and out.dtype == jnp.float32


def test_stride2_padding_is_symmetric():
    """A 3x3/2 conv on 32x32 with pad (1,1) samples windows centred on even pixels, like PyTorch.

    With Flax "SAME" ((0,1) padding) output (0,0) would not see the zero pad; here it does."""
    import flax.linen as nn

    from rsjax.models.resnet import PAD1

    _, v = _abstract("cifar_resnet20", 10)
    assert v["params"]["layer2_0"]["conv1"]["kernel"].shape == (3, 3, 16, 32)
    kernel = jnp.ones((3, 3, 16, 32))
    y = nn.Conv(32, (3, 3), (2, 2), padding=PAD1, use_bias=False).apply({"params": {"kernel": kernel}},
                                                                         jnp.ones((1, 32, 32, 16)))
    assert y.shape == (1, 16, 16, 32)
    assert float(y[0, 0, 0, 0]) == 4 * 16  # top-left window: 2x2 inside, the rest zero padding
    assert float(y[0, 15, 15, 0]) == 9 * 16  # bottom-right window is fully inside


def test_train_mode_updates_batch_stats():
    from rsjax.models.resnet import BasicBlock, ResNet

    model = ResNet(stage_sizes=(1, 1), block_cls=BasicBlock, num_classes=10, num_filters=4, stem="cifar")
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 8, 8, 3)), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    v = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 0.1, s.dtype), abstract)
    out, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    assert out.shape == (4, 10)
    old, new = v["batch_stats"]["bn1"]["mean"], upd["batch_stats"]["bn1"]["mean"]
    assert not np.allclose(old, new)  # running mean moved towards the batch mean (momentum 0.9)
    _, v = _abstract("lenet", 10)
    assert set(v) == {"params"}  # LeNet has no BatchNorm


def test_unknown_arch():
    with pytest.raises(RsjaxError, match="unknown architecture 'vgg16'"):
        build_model("vgg16", 10)
