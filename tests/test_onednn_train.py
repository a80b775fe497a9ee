"""oneDNN training convolutions (rsjax.kernels.onednn_train): XLA's convolution and its derivatives.

The primitives against ``lax.conv_general_dilated`` on shapes of every architecture (3x3 stride 1
and 2, the 1x1 projection, LeNet's 5x5, asymmetric padding): values, reverse-mode gradients in
both arguments, a gradient of a forward-mode derivative (the mixed second order DS's sigma slopes
need), and vmap over the activations and over the weights. Then the train step: the interceptor
really routes the model's convolutions (the custom calls are in the compiled step), a DS-Gaussian
step gives XLA's result, and a 4-device step over the mesh gives the 1-device one. The PyTorch
parity of the whole step with these kernels is in tests/test_train_parity.py (``kernels=onednn``).
Skipped, with the reason, where the extension did not build or oneDNN has no CPU engine.
"""

import functools
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from rsjax.kernels import onednn_train as T

REPO_ROOT = Path(__file__).resolve().parent.parent
_ok, _reason = T.load()
pytestmark = pytest.mark.skipif(not _ok, reason=f"oneDNN training kernels unavailable: {_reason}")

SHAPES = [  # (n, h, w, c, o, k, stride, ((pt, pb), (pl, pr)))
    (4, 16, 16, 16, 16, 3, 1, ((1, 1), (1, 1))),
    (4, 16, 16, 16, 32, 3, 2, ((1, 1), (1, 1))),
    (4, 16, 16, 16, 32, 1, 2, ((0, 0), (0, 0))),
    (3, 28, 28, 1, 6, 5, 1, ((0, 0), (0, 0))),
    (3, 9, 7, 5, 4, 3, 2, ((1, 2), (2, 0))),
]


def _ref(x, w, s, pad):
    return lax.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision="highest")


def _mine(x, w, s, pad):
    return T.conv(x, w, (s, s), pad)


def _close(a, b, tol=2e-5):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(float(np.abs(a).max()), 1e-30)
    assert np.abs(a - b).max() <= tol * scale, (np.abs(a - b).max(), scale)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:7])))
def test_primitives_equal_xla_convolution_and_derivatives(shape):
    n, h, w, c, o, k, s, pad = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, h, w, c)), jnp.float32)
    W = jnp.asarray(rng.normal(size=(k, k, c, o)), jnp.float32)
    ref, mine = functools.partial(_ref, s=s, pad=pad), functools.partial(_mine, s=s, pad=pad)
    _close(ref(x, W), jax.jit(mine)(x, W))

    def loss(fn):
        return lambda x, W: jnp.sum(jnp.sin(fn(x, W)))

    for a, b in zip(jax.grad(loss(ref), (0, 1))(x, W), jax.jit(jax.grad(loss(mine), (0, 1)))(x, W)):
        _close(a, b)

    def slope_loss(fn):  # d/d(x, W) of sum tanh(J_W fn . V): forward mode inside reverse mode
        V = jnp.cos(W)
        return lambda x, W: jnp.sum(jnp.tanh(x.sum() * 1e-3 + jax.jvp(lambda W: fn(x, W), (W,), (V,))[1]))

    for a, b in zip(jax.grad(slope_loss(ref), (0, 1))(x, W), jax.jit(jax.grad(slope_loss(mine), (0, 1)))(x, W)):
        _close(a, b, 1e-4)
    xs, Ws = jnp.stack([x, 2 * x]), jnp.stack([W, -W])
    _close(jax.vmap(ref, (0, None))(xs, W), jax.vmap(mine, (0, None))(xs, W))
    _close(jax.vmap(ref, (None, 0))(x, Ws), jax.vmap(mine, (None, 0))(x, Ws))
    xs2 = jnp.stack([x, 2 * x], axis=2)  # a mapped axis that is not the leading one
    _close(jax.vmap(ref, (2, None))(xs2, W), jax.vmap(mine, (2, None))(xs2, W))
    vg = lambda fn: jax.vmap(jax.grad(loss(fn), 1), (0, 0))  # noqa: E731 - per-example weight gradients
    _close(vg(ref)(xs, Ws), jax.jit(vg(mine))(xs, Ws))
    # a negative control for the comparison itself: weights 0.1% off fail it
    with pytest.raises(AssertionError):
        _close(ref(x, W), mine(x, W * 1.001))


def test_interceptor_same_padding_and_stride_equal_flax():
    """A ``nn.Conv(padding="SAME", strides=2)`` with bias on an odd input through the train
    interceptor: Flax's own output and gradients."""
    import flax.linen as nn

    mod = nn.Conv(6, (3, 3), strides=2, padding="SAME")
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4))
    v = mod.init(jax.random.key(1), x)

    def loss(v, x, routed):
        if routed:
            with nn.intercept_methods(T.train_interceptor()):
                return jnp.sum(jnp.sin(mod.apply(v, x)))
        return jnp.sum(jnp.sin(mod.apply(v, x)))

    hlo = jax.jit(functools.partial(loss, routed=True)).lower(v, x).as_text()
    assert "rsjax_onednn_train_fwd" in hlo
    for a, b in zip(jax.tree_util.tree_leaves(jax.grad(functools.partial(loss, routed=False), (0, 1))(v, x)),
                    jax.tree_util.tree_leaves(jax.grad(functools.partial(loss, routed=True), (0, 1))(v, x))):
        _close(a, b, 1e-5)


def test_bad_shapes_are_one_clear_error():
    from rsjax.errors import RsjaxError

    x, w = jnp.zeros((1, 2, 2, 4)), jnp.zeros((3, 3, 4, 4))
    with pytest.raises(RsjaxError, match="has no output"):
        T.conv(x, w, (1, 1), ((0, 0), (0, 0)))
    with pytest.raises(RsjaxError, match="padding"):
        T.conv(x, w, (1, 1), ((-1, 0), (0, 0)))


def test_primitive_info_names_the_implementation():
    info = T.primitive_info((8, 16, 16, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1)), "bwd_weights")
    assert info and "unavailable" not in info and "could not" not in info, info


def test_bad_dtype_is_refused():
    x = jnp.zeros((1, 8, 8, 4), jnp.bfloat16)
    with pytest.raises(TypeError, match="float32"):
        T.conv(x, jnp.zeros((3, 3, 4, 4), jnp.bfloat16), (1, 1), ((1, 1), (1, 1)))


def test_train_step_routes_every_convolution():
    """The compiled step of ResNet-20 holds the three kinds of oneDNN calls, one forward per conv
    layer (21 with the two projections), and no XLA convolution."""
    from jax.sharding import Mesh

    from rsjax.models import build_model
    from rsjax.training import step as S

    model = build_model("cifar_resnet20", 10)
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))

    def loss(params, x, onednn):
        logits, _ = S.train_apply(model, np.zeros(3, np.float32), np.ones(3, np.float32), params,
                                  v["batch_stats"], x, onednn=onednn, mesh=mesh)
        return logits.sum()

    x = jnp.ones((4, 32, 32, 3))
    hlo = jax.jit(jax.grad(functools.partial(loss, onednn=True))).lower(v["params"], x).as_text()
    assert hlo.count("rsjax_onednn_train_fwd") == 21, hlo.count("rsjax_onednn_train_fwd")
    assert hlo.count("rsjax_onednn_train_bwd_weights") == 21
    assert hlo.count("rsjax_onednn_train_bwd_data") >= 20  # the stem's input gradient is not needed
    assert "convolution(" not in hlo
    xla = jax.jit(jax.grad(functools.partial(loss, onednn=False))).lower(v["params"], x).as_text()
    assert "rsjax_onednn" not in xla and "convolution(" in xla  # the control


def test_ds_gaussian_step_equals_xla():
    """DS-Gaussian (forward-mode sigma slopes through the convolutions, then the weight gradient):
    one step with oneDNN gives XLA's parameters."""
    a = _one_step_params("ddrs-gaussian", "xla")
    b = _one_step_params("ddrs-gaussian", "onednn")
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        _close(x, y, 1e-5)


def _one_step_params(method, kernels):
    import functools as ft

    from jax.sharding import Mesh

    from rsjax.models import build_model
    from rsjax.training import step as S
    from rsjax.training.objectives import get_objective

    model = build_model("lenet", 10)
    v = jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1))))
    obj = get_objective(method)
    cfg = obj.config()
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    apply = ft.partial(S.train_apply, model, np.zeros(1, np.float32), np.ones(1, np.float32),
                       onednn=kernels == "onednn", mesh=mesh)
    if kernels == "onednn":  # no silent fallback to XLA
        x0 = jnp.zeros((8, 28, 28, 1))
        assert "rsjax_onednn_conv_train" in str(jax.make_jaxpr(lambda p: apply(p, {}, x0))(v["params"]))
    tx = S.make_optimizer(lr=0.05, schedule="constant", gamma=0.1, epochs=1, steps_per_epoch=10, momentum=0.9,
                          weight_decay=1e-4)
    batch = 8
    table = {k: jnp.asarray(a) for k, a in obj.init_example_state(cfg, batch, 0.25).items()}
    names = S.metric_names(obj, cfg, apply, num_classes=10, x_shape=(batch, 28, 28, 1), example_state=table,
                           params=v["params"], batch_stats={})
    state = S.TrainState(params=v["params"], batch_stats={}, opt_state=tx.init(v["params"]), example_state=table,
                         sums=S.zero_sums(names), step=jnp.int32(0))
    state = jax.device_put(state, S.state_shardings(mesh, state))
    step = S.make_train_step(obj, cfg, tx, apply, mesh, state, seed=0, sigma=0.25, num_classes=10)
    rng = np.random.default_rng(0)
    b = {"x": rng.random((batch, 28, 28, 1), dtype=np.float32), "y": rng.integers(0, 10, batch).astype(np.int32),
         "idx": np.arange(batch, dtype=np.int32), "row": np.arange(batch, dtype=np.int32)}
    state, _ = step(state, jax.device_put(b, S.batch_sharding(mesh)), np.int32(0), obj.phase(cfg, 10 ** 6))
    return jax.device_get((state.params, state.example_state))


FOUR_DEVICES = r"""
import sys, numpy as np, jax, jax.numpy as jnp, functools
from jax.sharding import Mesh
from rsjax.models import build_model
from rsjax.training import step as S
from rsjax.training.objectives import get_objective
assert jax.local_device_count() == 4
model = build_model("cifar_resnet20", 10)
v = jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
obj = get_objective("gaussian"); cfg = obj.config()
rng = np.random.default_rng(0)
b = {"x": rng.random((8, 32, 32, 3), dtype=np.float32), "y": rng.integers(0, 10, 8).astype(np.int32),
     "idx": np.arange(8, dtype=np.int32), "row": np.arange(8, dtype=np.int32)}
out = {}
for nd in (4, 1):
    mesh = Mesh(np.array(jax.devices()[:nd]), ("data",))
    apply = functools.partial(S.train_apply, model, np.zeros(3, np.float32), np.ones(3, np.float32),
                              onednn=True, mesh=mesh)
    jaxpr = str(jax.make_jaxpr(lambda p: apply(p, v["batch_stats"], jnp.zeros((8, 32, 32, 3))))(v["params"]))
    assert "rsjax_onednn_conv_train" in jaxpr and (nd == 1 or "shard_map" in jaxpr), nd
    tx = S.make_optimizer(lr=0.001, schedule="constant", gamma=0.1, epochs=1, steps_per_epoch=10, momentum=0.9,
                          weight_decay=1e-4)
    names = S.metric_names(obj, cfg, apply, num_classes=10, x_shape=(8, 32, 32, 3), example_state={},
                           params=v["params"], batch_stats=v["batch_stats"])
    st = S.TrainState(params=v["params"], batch_stats=v["batch_stats"], opt_state=tx.init(v["params"]),
                      example_state={}, sums=S.zero_sums(names), step=jnp.int32(0))
    st = jax.device_put(st, S.state_shardings(mesh, st))
    step = S.make_train_step(obj, cfg, tx, apply, mesh, st, seed=0, sigma=0.25, num_classes=10)
    for _ in range(3):
        st, _ = step(st, jax.device_put(b, S.batch_sharding(mesh)), np.int32(0))
    out[nd] = jax.device_get((st.params, st.batch_stats))
worst = 0.0
for a, c in zip(jax.tree_util.tree_leaves(out[4]), jax.tree_util.tree_leaves(out[1])):
    worst = max(worst, float(np.abs(a - c).max() / max(np.abs(c).max(), 1e-30)))
moved = float(np.abs(out[1][0]["fc"]["kernel"] - v["params"]["fc"]["kernel"]).max())
print("WORST", worst, "MOVED", moved)
"""


def test_four_devices_equal_one_device():
    """The convolutions run per device inside shard_map (batch sharded, weights replicated); the
    weight gradient is summed over the devices by shard_map's transpose: 3 steps on 4 forced CPU
    devices give the 1-device parameters and running statistics within 1e-5 of each tensor's scale.
    At lr 0.001, as tests/test_train.py's XLA version: on this random batch float32 differences in
    the all-reduce order grow with the step size (lr 0.01: 2.4e-3 after 3 steps, XLA's kernels
    alike; after one step both are within 2e-6)."""
    import os

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO_ROOT))
    r = subprocess.run([sys.executable, "-c", FOUR_DEVICES], env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("WORST")][-1].split()
    worst, moved = float(line[1]), float(line[3])
    assert worst < 1e-5, worst
    assert moved > 1e-5  # the steps really trained


def test_rsjax_train_with_onednn_kernels_and_resume_with_xla(tmp_path, capsys):
    """``rsjax train --cpu-kernels onednn``: recorded in the run's settings, learns (the loss falls),
    and a rerun with other kernels resumes (the same step up to float rounding) instead of refusing."""
    import json

    import pandas as pd

    from rsjax.cli import main
    from tests._helpers_train import write_mnist

    d = tmp_path / "mnist"
    write_mnist(d, n=128, seed=0, prefix="train")
    write_mnist(d, n=32, seed=1, prefix="t10k")
    out = tmp_path / "run"
    base = ["train", "mnist", "lenet", str(out), "--data-dir", str(d), "--batch", "32", "--lr", "0.05", "--quiet"]
    assert main(base + ["--epochs", "3", "--cpu-kernels", "onednn"]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["cpu_kernels"] == "onednn"
    log = pd.read_csv(out / "log.txt", delimiter="\t")
    assert len(log) == 3 and log["train loss"].iloc[-1] < log["train loss"].iloc[0]
    assert main(base + ["--epochs", "4", "--cpu-kernels", "xla"]) == 0
    assert len(pd.read_csv(out / "log.txt", delimiter="\t")) == 4


def test_materialize_is_the_identity_in_every_mode():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 5, 2)), jnp.float32)
    g = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(T.materialize)(x)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(jax.grad(lambda x: jnp.sum(T.materialize(x) * g))(x)), np.asarray(g))
    y, t = jax.jvp(T.materialize, (x,), (g,))
    np.testing.assert_array_equal(np.asarray(t), np.asarray(g))
    np.testing.assert_array_equal(np.asarray(jax.vmap(T.materialize)(x)), np.asarray(x))
    # x is not donated: it still holds its values after the aliased call
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def _widest_fusion(hlo: str, batch: int) -> int:
    """The most batch-sized operands (activations) any fusion of the compiled entry computation reads."""
    import re

    shapes = dict(re.findall(r"%(\S+) = (f32\[[0-9,]*\])", hlo))
    widest = 0
    for line in hlo[hlo.index("ENTRY"):].splitlines():
        m = re.match(r"\s+%\S+ = \S+ fusion\((.*?)\), kind", line)
        if m:
            ops = re.findall(r"%([^,\s)]+)", m.group(1))
            widest = max(widest, sum(1 for o in ops if shapes.get(o, "").startswith(f"f32[{batch},")))
    return widest


def test_block_outputs_are_materialised(monkeypatch):
    """Every residual block's output goes through ``rsjax_materialize`` (54 in ResNet-110), which
    keeps XLA from recomputing the chain of earlier blocks inside the later fusions: the widest
    fusion of the compiled gradient reads a few activations, against one per earlier block of the
    stage (up to XLA's limit) without it (the control)."""
    from jax.sharding import Mesh

    import rsjax.models.resnet as R
    from rsjax.models import build_model
    from rsjax.training import step as S

    model = build_model("cifar_resnet110", 10)
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    x = jnp.ones((4, 32, 32, 3))

    def compiled():
        def loss(params, x):
            logits, _ = S.train_apply(model, np.zeros(3, np.float32), np.ones(3, np.float32), params,
                                      v["batch_stats"], x, onednn=True, mesh=mesh)
            return logits.sum()

        return jax.jit(jax.grad(loss)).lower(v["params"], x).compile().as_text()

    hlo = compiled()
    assert hlo.count('custom_call_target="rsjax_materialize"') == 54
    monkeypatch.setattr(R, "RESIDUAL_BLOCKS", ())
    control = compiled()
    assert "rsjax_materialize" not in control
    widest, widest_control = _widest_fusion(hlo, 4), _widest_fusion(control, 4)
    assert widest <= 6 and widest_control >= 12, (widest, widest_control)
