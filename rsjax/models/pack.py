"""Width packing of narrow 3x3 convolutions: the same convolution, laid out for wide SIMD kernels.

A stride-1, padding-1, 3x3 convolution with few channels (CIFAR ResNet stage 1: 16 -> 16) keeps
XLA:CPU's convolution kernels far from the machine's peak: on the development CPU (AVX-512,
YNNPACK fusions on) a 16-channel 3x3 convolution at 32x32 runs at ~80 GMAC/s where the same
convolution with 32 channels runs at ~220 GMAC/s. Packing ``P`` horizontally adjacent pixels
into the channel axis turns it into a 3x3 convolution with ``P*C_in -> P*C_out`` channels over a
``W/P``-wide image, which does ``P`` times the multiply-adds (the packed kernel is partly zero)
at the wide-channel rate.

Packing is exact re-indexing, not an approximation. With ``x'[b, h, j, t*C + c] = x[b, h, P*j + t, c]``
(a free row-major reshape of NHWC) the output sub-pixel ``s`` of packed column ``j`` is

    y[b, h, P*j + s, o] = sum_{kh, kw, c} x[b, h + kh - 1, P*j + s + kw - 1, c] W[kh, kw, c, o]

and input column ``P*j + s + kw - 1`` lies in packed column ``j + dj`` (``dj`` in -1, 0, 1) at
sub-pixel ``t = s + kw - 1 - P*dj``. So the packed kernel is

    W'[kh, dj + 1, t*C_in + c, s*C_out + o] = W[kh, P*dj + t - s + 1, c, o]   if 0 <= P*dj + t - s + 1 < 3
                                            = 0                                otherwise,

and zero padding of one packed column equals zero padding of one pixel (P >= 2). Results agree
with the unpacked convolution to float rounding (tested).

Like BatchNorm folding (:mod:`rsjax.models.fold`) this is an inference-time rewrite that leaves the
Flax modules alone: :func:`pack_narrow` computes the packed kernels once, into a ``packed``
variable collection, and returns a :class:`PackedModel` whose ``apply`` runs the same module with
each packable ``nn.Conv`` computed packed (a Flax method interceptor). Apply it to a folded model
(``pack_narrow(*fold_bn(module, variables))``): the folded BatchNorms' per-channel bias adds are
then also written in the packed layout (:func:`add_channel_bias`), which is what makes packing
pay - with the bias added in the unpacked layout XLA:CPU inserts a relayout copy at every layer
and the packed network is *slower* than the unpacked one (docs/throughput.md).

Whether packing pays depends on the backend and its flags - under XLA:CPU's default convolution
emitter it is slower - so the choice is :func:`rsjax.xla.pack_narrow_convs`, measured by
``benchmarks/throughput.py --pack``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from rsjax.models.fold import InterceptedModel

# a convolution is packed when both of its channel counts are at most this
NARROW_CHANNELS = 16
COLLECTION = "packed"


def packed_kernel(kernel, pack: int = 2):
    """HWIO kernel ``(kh, 3, C_in, C_out)`` -> packed ``(kh, 3, P*C_in, P*C_out)`` (module doc)."""
    kh, kw, cin, cout = kernel.shape
    if kw != 3:
        raise ValueError(f"width packing needs a 3-wide kernel, got shape {kernel.shape}")
    if pack < 2:
        raise ValueError(f"pack must be >= 2, got {pack}")
    # 0/1 selection sel[dj, t, s, k] = [k == P*dj + t - s + 1] (numpy: a constant)
    sel = np.zeros((3, pack, pack, kw), np.float32)
    for dj in (-1, 0, 1):
        for t in range(pack):
            for s in range(pack):
                k = pack * dj + t - s + 1
                if 0 <= k < kw:
                    sel[dj + 1, t, s, k] = 1.0
    # W'[h, d, t, c, s, o] = sum_k sel[d, t, s, k] W[h, k, c, o]: a single term, exact
    packed = jnp.einsum("dtsk,hkco->hdtcso", jnp.asarray(sel, kernel.dtype), kernel,
                        precision=lax.Precision.HIGHEST)
    return packed.reshape(kh, 3, pack * cin, pack * cout)


def packed_conv(x, kernel_packed, pack: int, pad_h, bias=None, precision=None):
    """The 3-wide, stride-1, 'same' NHWC convolution of ``x`` with a packed kernel (module doc),
    plus the per-channel ``bias`` if given (added in the packed layout)."""
    b, h, w, cin = x.shape
    y = lax.conv_general_dilated(x.reshape(b, h, w // pack, pack * cin), kernel_packed, (1, 1),
                                 (pad_h, (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    if bias is not None:
        y = y + jnp.tile(bias, pack)
    return y.reshape(b, h, w, kernel_packed.shape[-1] // pack)


def add_channel_bias(y, bias, pack: int):
    """``y + bias`` for NHWC ``y``, written in the packed layout: ``(y' + tile(bias, P))`` reshaped back.

    The same numbers as ``y + bias``. Between packed convolutions XLA then sees only reshapes
    and elementwise ops with matching shapes, which it moves out of the way; a channel broadcast in
    the unpacked layout instead forces a relayout copy at every layer, which costs more than packing saves
    (docs/throughput.md).
    """
    b, h, w, c = y.shape
    return (y.reshape(b, h, w // pack, pack * c) + jnp.tile(bias, pack)).reshape(b, h, w, c)


def _narrow(kernel, max_channels):
    return (kernel.ndim == 4 and kernel.shape[1] == 3 and kernel.shape[0] in (1, 3)
            and max(kernel.shape[2], kernel.shape[3]) <= max_channels)


def pack_variables(variables, pack: int = 2, max_channels: int = NARROW_CHANNELS):
    """``variables`` plus a ``packed`` collection holding the packed kernel of every narrow
    (both channel counts <= ``max_channels``) 3-wide conv kernel, and the set of their module paths."""
    packed, paths = {}, []

    def walk(tree, path):
        for name, sub in tree.items():
            if not hasattr(sub, "items"):
                continue
            kernel = sub.get("kernel")
            if kernel is not None and not hasattr(kernel, "items") and _narrow(kernel, max_channels):
                node = packed
                for p in path + (name,):
                    node = node.setdefault(p, {})
                node["kernel"] = packed_kernel(jnp.asarray(kernel), pack)
                paths.append(path + (name,))
            else:
                walk(sub, path + (name,))

    walk(variables["params"], ())
    out = dict(variables)
    if paths:
        out[COLLECTION] = packed
    return out, frozenset(paths)


def _packable_call(mod, x, pack):
    """Whether this nn.Conv call is a stride-1 'same' 3-wide convolution over NHWC ``x`` with a
    width divisible by ``pack`` (else it runs unpacked)."""
    kh = mod.kernel_size[0]
    pad = mod.padding
    want = ((kh // 2, kh // 2), (1, 1))
    if isinstance(pad, str):
        ok_pad = pad == "SAME"
    elif isinstance(pad, int):
        ok_pad = ((pad, pad), (pad, pad)) == want
    else:
        ok_pad = tuple(tuple(p) if not isinstance(p, int) else (p, p) for p in pad) == want
    strides = mod.strides if mod.strides is not None else (1, 1)
    strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
    dil = mod.kernel_dilation if mod.kernel_dilation is not None else 1
    in_dil = mod.input_dilation if mod.input_dilation is not None else 1
    return (x.ndim == 4 and ok_pad and strides == (1, 1) and dil in (1, (1, 1)) and in_dil in (1, (1, 1))
            and mod.feature_group_count == 1 and mod.mask is None and x.shape[2] % pack == 0
            and getattr(mod, "conv_general_dilated", None) is None
            and getattr(mod, "conv_general_dilated_cls", None) is None)  # a custom primitive: keep it


def packed_conv_interceptor(packed_paths, pack: int = 2, folded_bn_paths=frozenset(), eps=None,
                            max_channels: int = NARROW_CHANNELS):
    """Flax method interceptor: an ``nn.Conv`` at a packed path computes its convolution packed,
    and a folded BatchNorm (``y + b'``, :mod:`rsjax.models.fold`) on a narrow map adds its bias in
    the packed layout (:func:`add_channel_bias`)."""

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or len(args) != 1 or kwargs:
            return next_fun(*args, **kwargs)
        x = args[0]
        if isinstance(mod, nn.Conv) and tuple(mod.path) in packed_paths and _packable_call(mod, x, pack):
            kernel = mod.get_variable(COLLECTION, "kernel")
            dtype = mod.dtype or jnp.result_type(x, kernel)
            bias = mod.get_variable("params", "bias").astype(dtype) if mod.use_bias else None
            return packed_conv(x.astype(dtype), kernel.astype(dtype), pack, (mod.kernel_size[0] // 2,) * 2, bias,
                               mod.precision)
        if (isinstance(mod, nn.BatchNorm) and tuple(mod.path) in folded_bn_paths and getattr(x, "ndim", 0) == 4
                and x.shape[-1] <= max_channels and x.shape[2] % pack == 0):
            if eps is not None and mod.epsilon != eps:
                raise ValueError(f"BN {'/'.join(mod.path)} has epsilon {mod.epsilon}, folded with {eps}")
            return add_channel_bias(x, mod.get_variable("params", "bias").astype(x.dtype), pack)
        return next_fun(*args, **kwargs)

    return interceptor


class PackedModel(InterceptedModel):
    """``module`` with its narrow convolutions computed width-packed: ``.apply(packed_variables, x)``."""

    def __init__(self, module, packed_paths, pack: int = 2):
        self.packed_paths = frozenset(packed_paths)
        self.pack = pack
        # wrapping a FoldedModel: its folded BatchNorms' bias adds are written packed too (this
        # interceptor is the outer one, so it sees them first)
        folded = getattr(module, "folded_paths", frozenset())
        super().__init__(module, packed_conv_interceptor(self.packed_paths, pack, folded, getattr(module, "eps", None)))

    def __repr__(self):
        return f"PackedModel({self.module!r}, {len(self.packed_paths)} packed convolutions, P={self.pack})"


def pack_narrow(module, variables, pack: int = 2, max_channels: int = NARROW_CHANNELS):
    """Width-pack every narrow 3x3 convolution of ``module`` for inference.

    Returns ``(model, packed_variables)`` with ``model.apply(packed_variables, x)`` equal to
    ``module.apply(variables, x)`` up to float rounding. Apply it after BatchNorm folding (it packs
    the kernels it is given). A model without narrow 3-wide convolutions comes back unchanged.
    """
    packed_vars, paths = pack_variables(variables, pack, max_channels)
    if not paths:
        return module, variables
    return PackedModel(module, paths, pack), packed_vars


__all__ = ["COLLECTION", "NARROW_CHANNELS", "PackedModel", "add_channel_bias", "pack_narrow", "pack_variables",
           "packed_conv", "packed_conv_interceptor", "packed_kernel"]
