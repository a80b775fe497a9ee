"""Inference-time BatchNorm folding: conv -> BN becomes one conv with a per-channel bias.

In eval mode a BatchNorm after a bias-free convolution computes, per output channel o,

    BN(conv(x, W))_o = (conv(x, W)_o - mean_o) * s_o + beta_o,   s_o = gamma_o / sqrt(var_o + eps)
                     = conv(x, W * s)_o + (beta_o - mean_o * s_o)

because convolution is linear in W. Folding rewrites every (conv, BN) pair listed by
:func:`rsjax.models.conv_bn_pairs` as kernel ``W' = W * s`` (scaled along the output axis O of
the HWIO kernel) and bias ``b' = beta - mean * s``: the same function up to float rounding
(logits agree to ~1e-6 in float32), with one multiply-add pass over every activation map and
the BN statistics removed from the forward pass.

The Flax modules are not changed: :func:`fold_bn` returns the folded variables plus a
:class:`FoldedModel` whose ``apply`` runs the *same* module with each folded BatchNorm replaced by ``y + b'``
(a Flax method interceptor keyed on the module path), so any model whose conv/BN pairs
:func:`~rsjax.models.conv_bn_pairs` finds folds without new model code. A BN that does not
directly follow a conv is left untouched.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rsjax.models import conv_bn_pairs

# PyTorch's BatchNorm2d default, used by every rsjax model (Flax BatchNorm(epsilon=1e-5)).
BN_EPS = 1e-5


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _unfreeze(tree):
    """Plain nested dicts (copies), whatever mapping type the variables came in."""
    if hasattr(tree, "items"):
        return {k: _unfreeze(v) for k, v in tree.items()}
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


def _delete(tree, path):
    """Remove tree[path] and then every dict left empty along the path."""
    nodes = [tree]
    for p in path[:-1]:
        nodes.append(nodes[-1][p])
    del nodes[-1][path[-1]]
    for node, key in zip(reversed(nodes[:-1]), reversed(path[:-1])):
        if node[key]:
            break
        del node[key]


def fold_variables(variables, eps: float = BN_EPS):
    """Folded copy of ``variables`` and the set of folded BN paths.

    For each (conv, bn) pair: ``params/conv/kernel <- W * s`` and ``params/bn = {'bias': b'}``
    with ``s = scale * rsqrt(var + eps)`` (exactly Flax's BatchNorm arithmetic) and
    ``b' = bias - mean * s``; the pair's ``batch_stats`` entries are removed. Computed in
    float32 whatever the storage dtype, then cast back to the kernel's dtype.
    """
    out = _unfreeze(variables)
    params = out["params"]
    stats = out.get("batch_stats", {})
    folded = []
    for conv_path, bn_path in conv_bn_pairs(params):
        conv, bn = _get(params, conv_path), _get(params, bn_path)
        st = _get(stats, bn_path)
        kernel = jnp.asarray(conv["kernel"])
        s = jnp.asarray(bn["scale"], jnp.float32) * jax.lax.rsqrt(jnp.asarray(st["var"], jnp.float32) + eps)
        if kernel.shape[-1] != s.shape[0]:
            raise ValueError(f"cannot fold {'/'.join(bn_path)}: {s.shape[0]} channels after a conv with "
                             f"{kernel.shape[-1]} outputs")
        conv["kernel"] = (kernel.astype(jnp.float32) * s).astype(kernel.dtype)
        bias = jnp.asarray(bn["bias"], jnp.float32) - jnp.asarray(st["mean"], jnp.float32) * s
        _set(params, bn_path, {"bias": bias})
        _delete(stats, bn_path)
        folded.append(bn_path)
    if "batch_stats" in out and not out["batch_stats"]:
        del out["batch_stats"]
    return out, frozenset(folded)


def folded_bn_interceptor(folded_paths, eps: float = BN_EPS):
    """Flax method interceptor: a BatchNorm at a folded path computes ``y + b'`` (no statistics)."""

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, nn.BatchNorm) and context.method_name == "__call__" and tuple(mod.path) in folded_paths:
            if mod.epsilon != eps:
                raise ValueError(f"BN {'/'.join(mod.path)} has epsilon {mod.epsilon}, folded with {eps}")
            y = args[0]
            return y + mod.get_variable("params", "bias").astype(y.dtype)
        return next_fun(*args, **kwargs)

    return interceptor


class InterceptedModel:
    """A Flax ``module`` whose ``apply`` runs under a method interceptor: an inference-time rewrite
    (BN folding, width packing) that leaves the module's code alone.

    Drop-in for the Flax module where only ``apply`` is used (e.g. ``load_classifier``); other
    attributes (``dtype``, ...) are those of the wrapped module. Wrappers nest: the outer one's
    interceptor sees each call first.
    """

    def __init__(self, module, interceptor):
        self.module = module
        self._interceptor = interceptor

    def apply(self, variables, *args, **kwargs):
        with nn.intercept_methods(self._interceptor):
            return self.module.apply(variables, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.__dict__["module"], name)


class FoldedModel(InterceptedModel):
    """``module`` with its folded BatchNorms computing ``y + b'``: ``.apply(folded_variables, x, ...)``."""

    def __init__(self, module, folded_paths, eps: float = BN_EPS):
        self.folded_paths = frozenset(folded_paths)
        self.eps = eps
        super().__init__(module, folded_bn_interceptor(self.folded_paths, eps))

    def __repr__(self):
        return f"FoldedModel({type(self.module).__name__}, {len(self.folded_paths)} folded BatchNorms)"


def fold_bn(module, variables, eps: float = BN_EPS):
    """Fold every conv -> BN pair of ``module``'s ``variables`` for inference.

    Returns ``(model, folded_variables)`` such that ``model.apply(folded_variables, x)`` equals
    ``module.apply(variables, x)`` (eval mode) up to float rounding; ``model.apply`` is pure and
    jit-compatible. A model without pairs (LeNet) comes back unchanged: ``(module, variables)``.
    """
    folded_vars, paths = fold_variables(variables, eps)
    if not paths:
        return module, variables
    return FoldedModel(module, paths, eps), folded_vars


__all__ = ["BN_EPS", "FoldedModel", "InterceptedModel", "fold_bn", "fold_variables", "folded_bn_interceptor"]
