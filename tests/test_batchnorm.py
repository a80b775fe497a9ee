"""Train-mode BatchNorm in affine form (rsjax.training.batchnorm) against Flax's nn.BatchNorm.

Values, running averages, reverse-mode gradients (input, scale, bias) and a forward-mode derivative
within float32 rounding of Flax's module, with and without scale and bias; the calls it does not
cover (eval mode, initialisation) run Flax's module bit for bit; and what reverse mode keeps: of
activation size, only the input x in the affine form, against x - mean and its product in Flax's
(the control).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsjax.training import batchnorm

SHAPE = (6, 5, 4, 3)


def _data():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(1.5, 2.0, SHAPE), jnp.float32)
    variables = {"params": {"scale": jnp.asarray(rng.normal(1.0, 0.3, SHAPE[-1]), jnp.float32),
                            "bias": jnp.asarray(rng.normal(0.0, 0.5, SHAPE[-1]), jnp.float32)},
                 "batch_stats": {"mean": jnp.asarray(rng.normal(size=SHAPE[-1]), jnp.float32),
                                 "var": jnp.asarray(rng.uniform(0.5, 2, SHAPE[-1]), jnp.float32)}}
    return x, variables


def _apply(bn, variables, x, affine):
    def run(v, x):
        y, upd = bn.apply(v, x, mutable=["batch_stats"])
        return y, upd["batch_stats"]

    if not affine:
        return run(variables, x)
    with nn.intercept_methods(batchnorm.interceptor):
        return run(variables, x)


def _close(a, b, tol=2e-6):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        u, v = np.asarray(u), np.asarray(v)
        assert np.abs(u - v).max() <= tol * max(np.abs(v).max(), 1e-30), (np.abs(u - v).max(), np.abs(v).max())


@pytest.mark.parametrize("use_scale,use_bias", [(True, True), (False, True), (True, False)])
def test_affine_batchnorm_equals_flax(use_scale, use_bias):
    x, variables = _data()
    params = {k: v for k, v in variables["params"].items() if (k == "scale" and use_scale) or (k == "bias" and use_bias)}
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, use_scale=use_scale, use_bias=use_bias)
    g = jnp.asarray(np.random.default_rng(1).normal(size=SHAPE), jnp.float32)

    def loss(v, x, affine):
        y, stats = _apply(bn, v, x, affine)
        return jnp.sum(jnp.maximum(y, 0) * g), (y, stats)

    outs = {}
    for affine in (False, True):
        (val, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables, x, affine)
        _, tangent = jax.jvp(lambda x: _apply(bn, variables, x, affine)[0], (x,), (g,))
        outs[affine] = (y, stats, grads, tangent)
    for a, b in zip(outs[True], outs[False]):
        _close(a, b)
    # the running averages moved (momentum 0.9 towards the batch statistics): the comparison is not vacuous
    assert np.abs(np.asarray(outs[True][1]["mean"]) - np.asarray(variables["batch_stats"]["mean"])).min() > 1e-3


def test_uncovered_calls_are_flax_bit_for_bit():
    x, variables = _data()
    bn = nn.BatchNorm(use_running_average=True, epsilon=1e-5)
    flax_y = bn.apply(variables, x)
    with nn.intercept_methods(batchnorm.interceptor):
        ours = bn.apply(variables, x)
        init = nn.BatchNorm(use_running_average=False).init(jax.random.PRNGKey(0), x)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(flax_y))
    ref = nn.BatchNorm(use_running_average=False).init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(ref)
    for a, b in zip(jax.tree_util.tree_leaves(init), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _saved_activations(affine):
    """What reverse mode keeps of activation size that it computed (not the input x, not g)."""
    from jax._src.ad_checkpoint import saved_residuals

    x, variables = _data()
    g = jnp.asarray(np.random.default_rng(1).normal(size=SHAPE), jnp.float32)
    bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    saved = saved_residuals(lambda v, x: jnp.sum(_apply(bn, v, x, affine)[0] * g), variables, x)
    return [what for aval, what in saved if aval.shape == SHAPE and what.startswith("output of")]


def test_affine_form_saves_no_activation_but_its_input():
    assert _saved_activations(affine=False)  # the control: Flax's form keeps x - mean (and its product)
    assert _saved_activations(affine=True) == []
