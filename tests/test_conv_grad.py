"""rsjax.models.conv_grad: chunked weight gradients equal the plain ones; the model routes to them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from rsjax.models import build_model
from rsjax.models.conv_grad import chunked_conv, chunked_conv_interceptor


@pytest.mark.parametrize("batch,strides,padding", [(12, (1, 1), "SAME"), (13, (2, 2), ((1, 1), (1, 1))),
                                                   (7, (1, 1), "VALID")])
def test_chunked_conv_value_and_gradients(batch, strides, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, 9, 9, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 5)), jnp.float32)
    t = jnp.asarray(rng.standard_normal(lax.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")).shape), jnp.float32)

    def plain(x, w):
        return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def loss(conv):
        return lambda x, w: jnp.sum(conv(x, w) * t)

    np.testing.assert_array_equal(chunked_conv(x, w, strides, padding, 4), plain(x, w))
    gx, gw = jax.grad(loss(plain), argnums=(0, 1))(x, w)
    cx, cw = jax.grad(loss(lambda a, b: chunked_conv(a, b, strides, padding, 4)), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(cx, gx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cw, gw, rtol=1e-5, atol=1e-4)
    tangents = (jnp.asarray(rng.standard_normal(x.shape), jnp.float32), jnp.asarray(rng.standard_normal(w.shape), jnp.float32))
    _, t_plain = jax.jvp(plain, (x, w), tangents)
    _, t_chunked = jax.jvp(lambda a, b: chunked_conv(a, b, strides, padding, 4), (x, w), tangents)
    np.testing.assert_allclose(t_chunked, t_plain, rtol=1e-5, atol=1e-4)  # forward mode works too
    wrong = jax.grad(lambda w: jnp.sum(plain(x[:4], w) * t[:4]))(w)  # one chunk alone: the test has teeth
    assert np.abs(np.asarray(wrong) - np.asarray(gw)).max() > 1e-2


def test_interceptor_gives_the_resnet_gradients_in_train_mode(monkeypatch):
    import rsjax.models.conv_grad as cg

    calls = []
    monkeypatch.setattr(cg, "chunked_conv", lambda *a: calls.append(a[2:]) or chunked_conv(*a))
    model = build_model("cifar_resnet20", 10)
    x = jnp.asarray(np.random.default_rng(1).random((10, 32, 32, 3)), jnp.float32)
    v = model.init(jax.random.PRNGKey(0), x[:1])

    def loss(p, chunked):
        def f():
            return model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                               mutable=["batch_stats"])[0]
        if chunked:
            with nn.intercept_methods(chunked_conv_interceptor(chunk=4)):
                return jnp.sum(f() ** 2)
        return jnp.sum(f() ** 2)

    a = jax.grad(lambda p: loss(p, False))(v["params"])
    b = jax.grad(lambda p: loss(p, True))(v["params"])
    assert len(calls) == 21  # every convolution of ResNet-20 (19 3x3, 2 1x1 shortcuts) took the chunked path
    for (path, u), w in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(w, u, rtol=2e-4, atol=2e-5 * float(np.abs(u).max()) + 1e-7,
                                   err_msg=jax.tree_util.keystr(path))
