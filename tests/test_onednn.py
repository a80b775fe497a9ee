"""oneDNN convolutions (rsjax.kernels.onednn): the same classifier as XLA's, to float rounding.

float32 logits within 1e-4 of the pure-XLA folded model on real images (real ResNet-20s, the real
LeNet) and on random-weight ResNet-110 / ResNet-50 at tiny batch; the same counts from the
sampler's jitted scan, on one device and over two forced host devices; bfloat16 clean accuracy of
the real ResNet-20 within 0.5 points of float32 on the 1017 real images; a convolution the
extension cannot run falls back to XLA with the right answer. Skipped, with the reason, where the
extension did not build or oneDNN has no CPU engine.
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsjax.kernels import onednn

REPO_ROOT = Path(__file__).resolve().parent.parent
_lib, _reason = onednn.load()
pytestmark = pytest.mark.skipif(_lib is None, reason=f"oneDNN extension unavailable: {_reason}")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, shared_data):
    from converters.pytorch import convert_checkpoint

    root = tmp_path_factory.mktemp("onednn")
    out = {}
    for name in ("cifar10_resnet20_noise0.25", "cifar10_resnet20_clean", "mnist_lenet_noise0.25"):
        out[name] = root / name
        convert_checkpoint(shared_data / "models" / name / "checkpoint.pth.tar", out[name], log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def cifar(shared_data):
    from rsjax.data import load_dataset

    ds = load_dataset("cifar10", "test", shared_data / "cifar10")
    return ds.batch(np.arange(len(ds)))


def _pair(path, dtype="float32"):
    from rsjax.classifier import load_classifier

    fx, _ = load_classifier(path, dtype=dtype, pack_narrow=False, cpu_kernels="xla")
    fo, meta = load_classifier(path, dtype=dtype, cpu_kernels="onednn")
    assert meta["cpu_kernels"] == "onednn" and not meta["pack_narrow"]
    return fx, fo


@pytest.mark.parametrize("name", ["cifar10_resnet20_noise0.25", "cifar10_resnet20_clean"])
def test_float32_logits_real_resnet20(converted, cifar, name):
    fx, fo = _pair(converted[name])
    x = cifar[0][:64]
    ref, got = np.asarray(fx(x)), np.asarray(fo(x))
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # the weight blobs were made once, at load time, for every convolution
    assert len(jax.tree_util.tree_leaves(fo.variables[onednn.COLLECTION])) == 1 + 9 * 2 + 2


def test_float32_logits_real_lenet(converted, shared_data):
    from rsjax.data import load_dataset

    fx, fo = _pair(converted["mnist_lenet_noise0.25"])
    ds = load_dataset("mnist", "test", shared_data / "mnist")
    x, y = ds.batch(np.arange(64))
    ref, got = np.asarray(fx(x)), np.asarray(fo(x))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert np.mean(got.argmax(1) == y) > 0.9


@pytest.mark.parametrize("arch,shape,batch", [("cifar_resnet110", (32, 32, 3), 2), ("resnet50", (32, 32, 3), 2)])
def test_float32_logits_random_resnets(arch, shape, batch):
    from test_fold import randomized_bn

    from rsjax.models import build_model
    from rsjax.models.fold import fold_bn

    module = build_model(arch, 10)
    x = jax.random.uniform(jax.random.key(0), (batch,) + shape)
    variables = randomized_bn(module.init(jax.random.key(1), x[:1]))
    folded, fv = fold_bn(module, variables)
    # random deep nets grow their activations (ResNet-110 logits ~1e3): scale the classifier head
    # so the logits are O(1) and an absolute 1e-4 is a meaningful float32 tolerance
    scale = 3.0 / float(np.abs(np.asarray(jax.jit(folded.apply)(fv, x))).max())
    fv["params"]["fc"] = {k: v * scale for k, v in fv["params"]["fc"].items()}
    model, ov = onednn.onednn_model(module, fv, shape, folded_paths=folded.folded_paths)
    ref = np.asarray(jax.jit(folded.apply)(fv, x))  # the pure-XLA (folded) model
    got = np.asarray(jax.jit(model.apply)(ov, x))
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_bfloat16_clean_accuracy_within_half_a_point(converted, cifar):
    from rsjax.classifier import load_classifier

    x, y = cifar
    assert len(y) == 1017
    f32, _ = load_classifier(converted["cifar10_resnet20_noise0.25"], dtype="float32", cpu_kernels="xla")
    f16, meta = load_classifier(converted["cifar10_resnet20_noise0.25"], dtype="bfloat16", cpu_kernels="onednn")
    assert meta["dtype"] == "bfloat16" and meta["cpu_kernels"] == "onednn"
    p32 = np.concatenate([np.asarray(f32(x[i:i + 512])).argmax(1) for i in range(0, len(x), 512)])
    p16 = np.concatenate([np.asarray(f16(x[i:i + 512])).argmax(1) for i in range(0, len(x), 512)])
    a32, a16 = 100 * np.mean(p32 == y), 100 * np.mean(p16 == y)
    assert a32 > 60  # the real model, not noise (it scores ~70% clean)
    assert abs(a16 - a32) <= 0.5, (a32, a16)


def test_counts_match_xla_in_the_sampler_scan(converted, cifar):
    """The same noise (image_keys) through the jitted lax.scan counter: the counts agree; a known
    truth: these images are classified correctly and the counts mostly fall on the label."""
    from rsjax.core.sampler import image_keys, make_counter

    fx, fo = _pair(converted["cifar10_resnet20_noise0.25"])
    x, y = cifar[0][:2], cifar[1][:2]
    keys = image_keys(0, np.arange(2))
    sigma = np.full((2,), 0.25, np.float32)
    cx = np.asarray(make_counter(fx, 10, samples_per_step=100)(x, sigma, keys, num=200))
    co = np.asarray(make_counter(fo, 10, samples_per_step=100)(x, sigma, keys, num=200))
    assert co.sum() == 400
    # float rounding may flip a draw whose top two logits tie to ~1e-6: allow one
    assert np.abs(co - cx).sum() <= 2, (co, cx)
    np.testing.assert_array_equal(co.argmax(1), cx.argmax(1))


_MULTI = """
import numpy as np, jax
from rsjax.classifier import load_classifier
from rsjax.core.sampler import image_keys, make_counter
assert jax.local_device_count() == 2
f, _ = load_classifier({path!r}, cpu_kernels="onednn")
x = np.random.default_rng(0).uniform(size=(1, 32, 32, 3)).astype(np.float32)
keys = image_keys(0, np.arange(1))
s = np.full((1,), 0.25, np.float32)
two = make_counter(f, 10, samples_per_step=60)(x, s, keys, num=200)
one = make_counter(f, 10, samples_per_step=60, devices=jax.local_devices()[:1])(x, s, keys, num=200)
print(np.asarray(two).tolist(), np.asarray(one).tolist())
assert (np.asarray(two) == np.asarray(one)).all()
"""


def test_two_host_devices_same_counts(converted):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}
    code = _MULTI.format(path=str(converted["cifar10_resnet20_noise0.25"]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]


class _Odd(nn.Module):
    """A dilated convolution (not routed) between two plain ones (routed)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), padding="SAME", name="conv1")(x))
        x = nn.Conv(8, (3, 3), kernel_dilation=2, padding="SAME", name="dilated")(x)
        return nn.Conv(4, (1, 1), strides=2, padding="VALID", name="conv2")(x)


def test_unsupported_layer_falls_back_to_xla(caplog):
    module = _Odd()
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 3))
    variables = module.init(jax.random.key(1), x)
    with caplog.at_level(logging.INFO, logger="rsjax.kernels.onednn"):
        model, ov = onednn.onednn_model(module, variables, (12, 12, 3))
    assert set(model.router.problems) == {("conv1",), ("conv2",)}
    assert any("dilated runs in XLA" in r.getMessage() for r in caplog.records)
    ref = np.asarray(jax.jit(module.apply)(variables, x))
    got = np.asarray(jax.jit(model.apply)(ov, x))
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    # another input size than the blobs were made for: XLA for those layers, still right
    x2 = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
    with caplog.at_level(logging.INFO, logger="rsjax.kernels.onednn"):
        got2 = np.asarray(model.apply(ov, x2))
    np.testing.assert_allclose(got2, np.asarray(module.apply(variables, x2)), atol=1e-5, rtol=0)
    assert any("differs from the prepared" in r.getMessage() for r in caplog.records)


def test_layers_without_a_primitive_on_this_cpu_fall_back(monkeypatch, capsys, caplog):
    """A CPU where oneDNN cannot create a layer's primitive (bfloat16 on an AVX2-only CPU): that
    layer runs in XLA with the same arithmetic, and one stderr line says how many did."""
    module = _Odd()
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 3))
    variables = module.init(jax.random.key(1), x)
    real = onednn._has_primitive
    monkeypatch.setattr(onednn, "_has_primitive", lambda p: False if p[4] == 8 else real(p))
    with caplog.at_level(logging.INFO, logger="rsjax.kernels.onednn"):
        model, ov = onednn.onednn_model(module, variables, (12, 12, 3))
    assert len(model.router.problems) == 1 and model.router.no_primitive == 1
    assert "oneDNN has no primitive on this CPU for 1 of 2 convolutions" in capsys.readouterr().err
    assert any("no primitive for it on this CPU" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(ov, x)), np.asarray(jax.jit(module.apply)(variables, x)),
                               atol=1e-5, rtol=0)


def test_resolve_choices():
    from rsjax.errors import RsjaxError

    assert onednn.resolve("xla") is False
    assert onednn.resolve("onednn", platform="cpu") is True
    assert onednn.resolve("auto", platform="gpu") is False
    with pytest.raises(RsjaxError, match="CPU backend"):
        onednn.resolve("onednn", platform="gpu")
    with pytest.raises(RsjaxError, match="cpu kernels must be"):
        onednn.resolve("fast")
