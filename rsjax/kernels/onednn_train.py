"""oneDNN convolutions for training on CPU: the forward pass and both gradients as JAX primitives.

XLA:CPU's gradient convolutions are its slow path (docs/training.md, "The step on a CPU"): on a
CIFAR ResNet-110 they take most of a training step. This module computes

    y  = conv(x, W)                         (conv_p,        RsjaxOnednnTrainFwd)
    dx = bwd_data(g, W)    = (dy/dx)^T g    (bwd_data_p,    RsjaxOnednnTrainBwdData)
    dW = bwd_weights(x, g) = (dy/dW)^T g    (bwd_weights_p, RsjaxOnednnTrainBwdWeights)

with oneDNN's training primitives (``csrc/onednn_train.cc``), NHWC activations, HWIO weights,
float32, explicit padding and strides, no dilation or groups.

Each of the three maps is bilinear, and each one's transposes are the other two:

    <conv(x, W), g>  = <x, bwd_data(g, W)>  = <W, bwd_weights(x, g)>

so ``conv_p`` is defined like ``lax.conv_general_dilated_p`` (``ad.defbilinear``): its JVP is
``conv(dx, W) + conv(x, dW)`` and its transposes are ``bwd_data`` (in x) and ``bwd_weights``
(in W); ``bwd_data_p`` transposes to ``conv`` (in g) and ``bwd_weights`` (in W), and
``bwd_weights_p`` to ``bwd_data`` (in x) and ``conv`` (in g). Forward mode, reverse mode and any
mix of them (DS's sigma slopes, :mod:`rsjax.training.ds`) therefore work to every order, and
every derivative is again a oneDNN call. ``vmap`` folds a mapped activation axis into the batch,
and maps sequentially (``lax.map``) otherwise.

:func:`materialize` is the identity through an opaque call (``RsjaxMaterialize``, its output aliasing
its input): XLA:CPU's fusion pass recomputes a residual block's output inside every consumer (the
next block's residual add, the ReLU masks of the backward pass) from the BatchNorm inputs of every
block before it, so the passes of a stage of L blocks read O(L^2) activations; cut at each block's
output they read O(L) (docs/training.md, "The step on a CPU").

Across several devices the step is jitted over a ``("data",)`` mesh; a custom call has no
partitioning rule, so :func:`conv` runs the primitive inside ``shard_map`` over that mesh (the
batch sharded, the weights replicated and cast to varying, whose transpose is the ``psum`` that
sums the devices' weight gradients, as XLA does for its own convolutions).

:func:`train_interceptor` routes the plain ``nn.Conv`` layers of a model here (a Flax method
interceptor; the model code is untouched), as :mod:`rsjax.models.conv_grad` does for XLA.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import PartitionSpec as P

from rsjax.errors import RsjaxError

TARGETS = {"fwd": "rsjax_onednn_train_fwd", "bwd_data": "rsjax_onednn_train_bwd_data",
           "bwd_weights": "rsjax_onednn_train_bwd_weights"}
SYMBOLS = {"fwd": "RsjaxOnednnTrainFwd", "bwd_data": "RsjaxOnednnTrainBwdData",
           "bwd_weights": "RsjaxOnednnTrainBwdWeights"}
MATERIALIZE = ("rsjax_materialize", "RsjaxMaterialize")


def _out_hw(in_hw, k_hw, strides, padding):
    return tuple((n + lo + hi - k) // s + 1 for n, k, s, (lo, hi) in zip(in_hw, k_hw, strides, padding))


def _attrs(strides, padding):
    (pt, pb), (pl, pr) = padding
    return dict(sh=np.int64(strides[0]), sw=np.int64(strides[1]), pt=np.int64(pt), pb=np.int64(pb),
                pl=np.int64(pl), pr=np.int64(pr))


def _ffi(kind, out_shape, a, b, strides, padding):
    call = jax.ffi.ffi_call(TARGETS[kind], jax.ShapeDtypeStruct(out_shape, jnp.float32))
    return call(a, b, **_attrs(strides, padding))


# ------------------------------------------------------------------------------ the primitives

conv_p = Primitive("rsjax_onednn_conv_train")
bwd_data_p = Primitive("rsjax_onednn_conv_bwd_data")
bwd_weights_p = Primitive("rsjax_onednn_conv_bwd_weights")


def _conv_shape(x, w, strides, padding):
    return (x.shape[0],) + _out_hw(x.shape[1:3], w.shape[:2], strides, padding) + (w.shape[3],)


def _conv_impl(x, w, *, strides, padding):
    return _ffi("fwd", _conv_shape(x, w, strides, padding), x, w, strides, padding)


def _bwd_data_shape(g, w, *, strides, padding, in_hw):
    return (g.shape[0],) + tuple(in_hw) + (w.shape[2],)


def _bwd_data_impl(g, w, *, strides, padding, in_hw):
    return _ffi("bwd_data", _bwd_data_shape(g, w, strides=strides, padding=padding, in_hw=in_hw), g, w, strides,
                padding)


def _bwd_weights_shape(x, g, *, strides, padding, k_hw):
    return tuple(k_hw) + (x.shape[3], g.shape[3])


def _bwd_weights_impl(x, g, *, strides, padding, k_hw):
    return _ffi("bwd_weights", _bwd_weights_shape(x, g, strides=strides, padding=padding, k_hw=k_hw), x, g, strides,
                padding)


def _num_varying(aval):
    mat = getattr(aval, "mat", None)
    return len(getattr(mat, "varying", ()) or ())


def _abstract(shape_fn):
    def rule(a, b, **params):
        if a.dtype != jnp.float32 or b.dtype != jnp.float32:
            raise TypeError(f"oneDNN training convolutions take float32, got {a.dtype} and {b.dtype}")
        # inside shard_map (conv() below) both operands vary over "data" (the weights through
        # pcast), so the result takes the axis types of either; update() keeps them
        varying = a if _num_varying(a) >= _num_varying(b) else b
        return varying.update(shape=shape_fn(a, b, **params), dtype=jnp.float32, weak_type=False)

    return rule


conv_p.def_abstract_eval(_abstract(_conv_shape))
bwd_data_p.def_abstract_eval(_abstract(_bwd_data_shape))
bwd_weights_p.def_abstract_eval(_abstract(_bwd_weights_shape))
for _p, _impl in ((conv_p, _conv_impl), (bwd_data_p, _bwd_data_impl), (bwd_weights_p, _bwd_weights_impl)):
    _p.def_impl(_impl)
    mlir.register_lowering(_p, mlir.lower_fun(_impl, multiple_results=False), platform="cpu")


def _shape(v):
    """Shape of a transpose rule's operand: an undefined primal (or gradient accumulator) or a value."""
    return v.aval.shape


# conv(x, W): transposes in x and in W
ad.defbilinear(conv_p,
               lambda ct, x, w, *, strides, padding: bwd_data_p.bind(ct, w, strides=strides, padding=padding,
                                                                     in_hw=tuple(_shape(x)[1:3])),
               lambda ct, x, w, *, strides, padding: bwd_weights_p.bind(x, ct, strides=strides, padding=padding,
                                                                        k_hw=tuple(_shape(w)[:2])))
# bwd_data(g, W): <bwd_data(g, W), u> = <g, conv(u, W)> = <W, bwd_weights(u, g)>
ad.defbilinear(bwd_data_p,
               lambda ct, g, w, *, strides, padding, in_hw: conv_p.bind(ct, w, strides=strides, padding=padding),
               lambda ct, g, w, *, strides, padding, in_hw: bwd_weights_p.bind(ct, g, strides=strides, padding=padding,
                                                                               k_hw=tuple(_shape(w)[:2])))
# bwd_weights(x, g): <bwd_weights(x, g), V> = <g, conv(x, V)> = <x, bwd_data(g, V)>
ad.defbilinear(bwd_weights_p,
               lambda ct, x, g, *, strides, padding, k_hw: bwd_data_p.bind(g, ct, strides=strides, padding=padding,
                                                                           in_hw=tuple(_shape(x)[1:3])),
               lambda ct, x, g, *, strides, padding, k_hw: conv_p.bind(x, ct, strides=strides, padding=padding))


def _batch_rule(prim, foldable):
    """vmap of ``prim``: when only argument 0 is mapped and ``foldable``, the mapped axis joins the
    batch (one call); otherwise one call per mapped index (``lax.map``)."""

    def rule(args, dims, **params):
        a, b = args
        da, db = dims
        if foldable and db is None:
            a = jnp.moveaxis(a, da, 0)
            v, n = a.shape[:2]
            out = prim.bind(a.reshape((v * n,) + a.shape[2:]), b, **params)
            return out.reshape((v, n) + out.shape[1:]), 0
        size = a.shape[da] if da is not None else b.shape[db]
        a = jnp.moveaxis(a, da, 0) if da is not None else jnp.broadcast_to(a, (size,) + a.shape)
        b = jnp.moveaxis(b, db, 0) if db is not None else jnp.broadcast_to(b, (size,) + b.shape)
        return jax.lax.map(lambda ab: prim.bind(ab[0], ab[1], **params), (a, b)), 0

    return rule


batching.primitive_batchers[conv_p] = _batch_rule(conv_p, True)
batching.primitive_batchers[bwd_data_p] = _batch_rule(bwd_data_p, True)
batching.primitive_batchers[bwd_weights_p] = _batch_rule(bwd_weights_p, False)


# ------------------------------------------------------------------------------ the convolution

@functools.lru_cache(maxsize=None)
@functools.lru_cache(maxsize=None)
def load():
    """``(True, None)`` when the extension has the training targets (registered here, once), else
    ``(False, reason)``."""
    from rsjax.kernels import onednn

    lib, reason = onednn.load()
    if lib is None:
        return False, reason
    targets = [(TARGETS[kind], sym) for kind, sym in SYMBOLS.items()] + [MATERIALIZE]
    for target, sym in targets:
        if not hasattr(lib, sym):
            return False, "the extension was built without the training kernels (reinstall rsjax)"
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, sym)), platform="cpu")
    return True, None


def resolve(choice: str, platform: str | None = None) -> bool:
    """Whether ``--cpu-kernels choice`` routes the train step's convolutions to oneDNN (as
    :func:`rsjax.kernels.onednn.resolve`: ``onednn`` insists, ``auto`` falls back to XLA with one line)."""
    from rsjax.kernels import onednn

    if not onednn.resolve(choice, platform):
        return False
    ok, reason = load()
    if not ok:
        if choice == "onednn":
            raise RsjaxError(f"--cpu-kernels onednn: {reason}")
        print(f"rsjax: oneDNN training kernels unavailable: {reason}; using XLA's convolutions", file=sys.stderr)
    return ok


def primitive_info(x_shape, w_shape, strides, padding, kind="fwd"):
    """The implementation oneDNN runs for primitive ``kind`` (fwd, bwd_data, bwd_weights) of a
    convolution of NHWC ``x_shape`` with HWIO ``w_shape`` (e.g. ``brg_conv_fwd:avx2``), with
    `` +relayout`` when the HWIO weights are reordered per call."""
    from rsjax.kernels import onednn

    lib, reason = onednn.load()
    if lib is None:
        return f"unavailable: {reason}"
    (pt, pb), (pl, pr) = padding
    p = (*x_shape, w_shape[3], w_shape[0], w_shape[1], strides[0], strides[1], pt, pb, pl, pr)
    out = ctypes.create_string_buffer(256)
    lib.rsjax_onednn_train_impl((ctypes.c_int64 * 13)(*p), list(SYMBOLS).index(kind), out, len(out))
    return out.value.decode(errors="replace")


def conv(x, w, strides, padding, mesh=None):
    """``lax.conv_general_dilated(x, w, strides, padding)`` (NHWC, HWIO, explicit padding pairs) in
    oneDNN, differentiable to every order; over ``mesh`` (axis ``"data"``, more than one device)
    per device on its shard of the batch."""
    if jnp.dtype(x.dtype) != jnp.float32 or jnp.dtype(w.dtype) != jnp.float32:
        raise TypeError(f"oneDNN training convolutions take float32, got {x.dtype} and {w.dtype}")
    ok, reason = load()  # registers the FFI targets (once)
    if not ok:
        raise RsjaxError(f"oneDNN training kernels: {reason}")
    strides, padding = tuple(int(s) for s in strides), tuple((int(a), int(b)) for a, b in padding)
    if min(strides) < 1 or min(min(p) for p in padding) < 0:
        raise RsjaxError(f"oneDNN convolution: strides {strides} must be >= 1 and padding {padding} >= 0")
    if min(_out_hw(x.shape[1:3], w.shape[:2], strides, padding)) < 1:
        raise RsjaxError(f"oneDNN convolution: a {w.shape[0]}x{w.shape[1]} kernel on a {x.shape[1]}x{x.shape[2]} "
                         f"input with padding {padding} has no output")
    bind = functools.partial(conv_p.bind, strides=strides, padding=padding)
    if mesh is None or mesh.size == 1:
        return bind(x, w)
    # the weights enter as varying over "data" (pcast), whose transpose is the psum that adds the
    # devices' weight gradients
    return jax.shard_map(lambda x, w: bind(x, jax.lax.pcast(w, "data", to="varying")), mesh=mesh,
                         in_specs=(P("data"), P()), out_specs=P("data"))(x, w)


materialize_p = Primitive("rsjax_materialize")


def _materialize_impl(x):
    return jax.ffi.ffi_call(MATERIALIZE[0], jax.ShapeDtypeStruct(x.shape, x.dtype), input_output_aliases={0: 0})(x)


# the identity: the same type (inside shard_map, the same varying axes), the tangent passes
# through (only primal values are materialised), and a mapped axis stays where it is
materialize_p.def_abstract_eval(lambda x: x)
materialize_p.def_impl(_materialize_impl)
mlir.register_lowering(materialize_p, mlir.lower_fun(_materialize_impl, multiple_results=False), platform="cpu")
ad.primitive_jvps[materialize_p] = lambda primals, tangents: (materialize_p.bind(primals[0]), tangents[0])
batching.primitive_batchers[materialize_p] = lambda args, dims: (materialize_p.bind(args[0]), dims[0])


def materialize(x, mesh=None):
    """``x``, computed into a buffer of its own before any consumer reads it (see the module
    docstring); over ``mesh`` (axis ``"data"``) per device on its shard of the batch."""
    ok, reason = load()
    if not ok:
        raise RsjaxError(f"oneDNN training kernels: {reason}")
    if mesh is None or mesh.size == 1:
        return materialize_p.bind(x)
    return jax.shard_map(materialize_p.bind, mesh=mesh, in_specs=P("data"), out_specs=P("data"))(x)


def train_interceptor(mesh=None):
    """Flax method interceptor: every plain 2-D ``nn.Conv`` (float32, no dilation, one feature
    group, explicit or SAME/VALID padding) computes :func:`conv` with its own kernel and bias, and
    every residual block's output (``rsjax.models.resnet.RESIDUAL_BLOCKS``) goes through :func:`materialize`;
    anything else runs unchanged."""
    from rsjax.kernels.onednn import conv_problem
    from rsjax.models.resnet import RESIDUAL_BLOCKS

    def splits(a):  # a batch the mesh divides (the primitives run per device on equal shards)
        return a.shape[0] % (mesh.size if mesh else 1) == 0

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, RESIDUAL_BLOCKS):
            out = next_fun(*args, **kwargs)
            return materialize(out, mesh) if splits(out) else out
        if (context.method_name != "__call__" or not isinstance(mod, nn.Conv) or len(args) != 1 or kwargs
                or getattr(args[0], "ndim", 0) != 4):
            return next_fun(*args, **kwargs)
        x = args[0]
        kernel = mod.get_variable("params", "kernel")
        dtype = jnp.dtype(mod.dtype or jnp.result_type(x, kernel))
        # the inference path's test of a plain convolution (dilation, groups, mask, custom conv,
        # padding, empty output), then float32 throughout and a batch that splits over the mesh
        params, _ = conv_problem(mod, x.shape, dtype)
        if (params is None or dtype != jnp.float32 or kernel.dtype != jnp.float32 or x.dtype != jnp.float32
                or not splits(x)):
            return next_fun(*args, **kwargs)
        strides, pads = params[7:9], ((params[9], params[10]), (params[11], params[12]))
        y = conv(x, kernel, strides, pads, mesh)
        if mod.use_bias:
            y = y + mod.get_variable("params", "bias")
        return y

    return interceptor


__all__ = ["bwd_data_p", "bwd_weights_p", "conv", "conv_p", "load", "materialize", "materialize_p", "primitive_info",
           "resolve", "train_interceptor"]
