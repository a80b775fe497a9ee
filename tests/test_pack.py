"""Width packing of narrow convolutions (rsjax.models.pack): the same convolution, re-indexed."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from rsjax.models import build_model
from rsjax.models.fold import fold_bn
from rsjax.models.pack import PackedModel, pack_narrow, packed_conv, packed_kernel
from rsjax.xla import pack_narrow_convs

DN = ("NHWC", "HWIO", "NHWC")


def direct(x, w, pad):
    return lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=DN, precision=lax.Precision.HIGHEST)


@pytest.mark.parametrize("pack", [2, 4])
@pytest.mark.parametrize("kh,cin,cout", [(3, 16, 16), (3, 3, 16), (3, 16, 8), (1, 5, 7)])
def test_packed_convolution_equals_direct(pack, kh, cin, cout):
    rng = np.random.default_rng(kh * 100 + cin + cout + pack)
    x = jnp.asarray(rng.normal(size=(3, 8, 16, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kh, 3, cin, cout)), jnp.float32)
    pad_h = (kh // 2, kh // 2)
    with jax.default_matmul_precision("highest"):
        got = packed_conv(x, packed_kernel(w, pack), pack, pad_h)
    np.testing.assert_allclose(np.asarray(got), np.asarray(direct(x, w, (pad_h, (1, 1)))), atol=1e-4, rtol=1e-5)


def test_packed_kernel_places_each_tap_once():
    """Every tap of the 3-wide kernel appears exactly P times in the packed kernel (once per output
    sub-pixel), and the rest is zero: no tap lost, none duplicated."""
    w = jnp.arange(1, 3 * 3 * 2 * 2 + 1, dtype=jnp.float32).reshape(3, 3, 2, 2)
    wp = np.asarray(packed_kernel(w, 2))
    assert wp.shape == (3, 3, 4, 4)
    vals, counts = np.unique(wp[wp != 0], return_counts=True)
    np.testing.assert_array_equal(vals, np.arange(1, 37))
    assert (counts == 2).all()
    assert (wp == 0).sum() == wp.size - 2 * 36  # half of the packed kernel is structurally zero


def test_packed_kernel_rejects_bad_shapes():
    with pytest.raises(ValueError, match="3-wide"):
        packed_kernel(jnp.ones((5, 5, 2, 2)), 2)
    with pytest.raises(ValueError, match="pack"):
        packed_kernel(jnp.ones((3, 3, 2, 2)), 1)


class Net(nn.Module):
    """Every kind of convolution the interceptor must leave alone, beside two it must pack."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(16, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="narrow")(x)  # packed
        x = nn.Conv(16, (3, 3), padding="SAME", name="narrow_same_bias")(x)  # packed, with its bias
        x = nn.Conv(16, (3, 3), (2, 2), padding=((1, 1), (1, 1)), name="stride2")(x)
        x = nn.Conv(32, (3, 3), padding=((1, 1), (1, 1)), name="wide")(x)
        x = nn.Conv(16, (5, 5), padding=((2, 2), (2, 2)), name="five")(x)
        x = nn.Conv(16, (3, 3), padding="VALID", name="valid")(x)
        x = x[:, :, :-1]  # odd width
        return nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), name="odd_width")(x)


def test_interceptor_packs_exactly_the_packable_calls(monkeypatch):
    """Only stride-1 'same' 3-wide convolutions with <= 16 channels and an even width are packed;
    the result equals the unpacked network."""
    import rsjax.models.pack as pack_mod

    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    net = Net()
    variables = net.init(jax.random.key(1), x)
    model, packed_vars = pack_narrow(net, variables)
    assert isinstance(model, PackedModel)
    # kernels eligible by shape: 3-wide with <= 16 channels (the call-time checks do the rest)
    assert model.packed_paths == {("narrow",), ("narrow_same_bias",), ("stride2",), ("valid",), ("odd_width",)}
    calls = []
    real = pack_mod.packed_conv
    monkeypatch.setattr(pack_mod, "packed_conv", lambda *a: calls.append(a[0].shape) or real(*a))
    got = model.apply(packed_vars, x)
    assert calls == [(2, 16, 16, 3), (2, 16, 16, 16)]
    np.testing.assert_allclose(np.asarray(got), np.asarray(net.apply(variables, x)), atol=1e-4, rtol=0)


def test_packed_kernels_are_precomputed_variables():
    """The packed kernels are variables (inputs of the compiled computation), not computed in the
    forward pass: XLA:CPU runs convolutions with in-graph kernels much slower."""
    module = build_model("cifar_resnet20", 10)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    model, packed_vars = pack_narrow(module, variables)
    assert packed_vars["packed"]["conv1"]["kernel"].shape == (3, 3, 6, 32)
    assert packed_vars["packed"]["layer1_0"]["conv2"]["kernel"].shape == (3, 3, 32, 32)
    assert "layer2_0" not in packed_vars["packed"]  # the 32-channel stage is not narrow
    jaxpr = str(jax.make_jaxpr(model.apply)(packed_vars, jnp.zeros((1, 32, 32, 3))))
    assert "dot_general" in str(jax.make_jaxpr(lambda w: packed_kernel(w))(jnp.ones((3, 3, 2, 2))))
    assert jaxpr.count("dot_general") == 1  # the final Dense only: no kernel is built in the forward


def test_models_without_narrow_convolutions_are_unchanged():
    module = build_model("lenet", 10)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    model, out = pack_narrow(module, variables)
    assert model is module and out is variables


@pytest.mark.parametrize("fold", [False, True])
def test_packed_resnet_computes_the_same_logits(fold):
    """Packed and unpacked ResNet-20 (random weights, randomised BN statistics) agree to float
    rounding, with or without BN folding (packing then uses the folded kernels)."""
    from tests.test_fold import randomized_bn

    plain = build_model("cifar_resnet20", 10)
    x = jax.random.uniform(jax.random.key(3), (8, 32, 32, 3))
    variables = randomized_bn(plain.init(jax.random.key(1), x[:1]), seed=2)
    if fold:
        plain, variables = fold_bn(plain, variables)
    packed, packed_vars = pack_narrow(plain, variables)
    assert len(packed.packed_paths) == 1 + 3 * 2  # stem + stage 1
    ref = np.asarray(jax.jit(plain.apply)(variables, x))
    got = np.asarray(jax.jit(packed.apply)(packed_vars, x))
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_packed_real_classifier_predicts_the_same(tmp_path, shared_data):
    """The real sigma=0.25 ResNet-20 loaded packed and unpacked: logits within 1e-4 on real images."""
    from converters.pytorch import convert_checkpoint
    from rsjax.classifier import load_classifier
    from rsjax.data import load_dataset

    out = tmp_path / "model"
    convert_checkpoint(shared_data / "models" / "cifar10_resnet20_noise0.25" / "checkpoint.pth.tar", out,
                       log=lambda *a: None)
    x = load_dataset("cifar10", "test", shared_data / "cifar10").batch(np.arange(64))[0]
    f_plain, meta_plain = load_classifier(out, pack_narrow=False)
    f_packed, meta_packed = load_classifier(out, pack_narrow=True)
    assert (meta_plain["pack_narrow"], meta_packed["pack_narrow"]) == (False, True)
    np.testing.assert_allclose(np.asarray(f_packed(x)), np.asarray(f_plain(x)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend,flags,want", [
    ("cpu", "--xla_cpu_experimental_ynn_fusion_type=individual_convolution,eltwise,dot", True),
    ("cpu", "--xla_cpu_experimental_ynn_fusion_type=eltwise", False),
    ("cpu", "", False),
    ("cpu", "--xla_cpu_experimental_ynn_fusion_type=individual_convolution "
            "--xla_cpu_experimental_ynn_fusion_type=eltwise", False),  # the last one wins in XLA
    ("gpu", "--xla_cpu_experimental_ynn_fusion_type=individual_convolution", False),
])
def test_packing_only_where_measured_to_help(backend, flags, want):
    assert pack_narrow_convs(backend, flags) is want
    assert pack_narrow_convs(backend, flags, folded=False) is False


class IntPadded(nn.Module):
    """An int padding and a keyword-only submodule call: valid Flax the interceptor must handle."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), padding=1, name="int_pad")(x)  # packed: the same as ((1, 1), (1, 1))
        x = nn.Conv(8, (3, 3), padding=1, precision=lax.Precision.HIGHEST, name="precise")(x)
        return nn.Dense(4, name="head")(inputs=x.mean(axis=(1, 2)))  # called with a keyword only


def test_int_padding_keyword_calls_and_precision(monkeypatch):
    import rsjax.models.pack as pack_mod

    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    net = IntPadded()
    variables = net.init(jax.random.key(1), x)
    model, packed_vars = pack_narrow(net, variables)
    seen = []
    real = pack_mod.packed_conv
    monkeypatch.setattr(pack_mod, "packed_conv", lambda *a: seen.append(a[-1]) or real(*a))
    got = model.apply(packed_vars, x)
    assert seen == [None, lax.Precision.HIGHEST]  # both packed, each with its own precision
    np.testing.assert_allclose(np.asarray(got), np.asarray(net.apply(variables, x)), atol=1e-4, rtol=0)


def test_folded_bias_adds_are_packed(monkeypatch):
    """The performance of packing rests on the folded BNs' bias adds being written packed: in a
    folded, packed ResNet-20 every narrow folded BN (stem + stage 1) goes through add_channel_bias."""
    import rsjax.models.pack as pack_mod

    module = build_model("cifar_resnet20", 10)
    x = jnp.zeros((2, 32, 32, 3))
    model, variables = pack_narrow(*fold_bn(module, module.init(jax.random.key(0), x)))
    calls = []
    real = pack_mod.add_channel_bias
    monkeypatch.setattr(pack_mod, "add_channel_bias", lambda y, b, p: calls.append(y.shape) or real(y, b, p))
    model.apply(variables, x)
    assert calls == [(2, 32, 32, 16)] * (1 + 3 * 2)


def test_packing_is_the_callers_choice_and_needs_folding(tmp_path, shared_data, monkeypatch):
    """The layout decision lives in rsjax.xla (pack where the XLA flags hand convolutions to
    YNNPACK, and only a folded model: unfolded BNs add their bias unpacked, the slow layout);
    load_classifier packs only when asked, whatever XLA_FLAGS says."""
    from converters.pytorch import convert_checkpoint
    from rsjax.classifier import load_classifier
    from rsjax.xla import pack_narrow_convs

    out = tmp_path / "model"
    convert_checkpoint(shared_data / "models" / "cifar10_resnet20_noise0.25" / "checkpoint.pth.tar", out,
                       log=lambda *a: None)
    ynn = "--xla_cpu_experimental_ynn_fusion_type=individual_convolution,eltwise"
    monkeypatch.setenv("XLA_FLAGS", ynn)
    assert pack_narrow_convs() is True and pack_narrow_convs(folded=False) is False
    assert pack_narrow_convs(xla_flags="") is False
    assert load_classifier(out)[1]["pack_narrow"] is False  # not read from the environment
    assert load_classifier(out, pack_narrow=True).meta["pack_narrow"] is True
    assert load_classifier(out, fold_bn=False, pack_narrow=True).meta["pack_narrow"] is False
