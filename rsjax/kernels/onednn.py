"""oneDNN convolutions with fused epilogues on CPU, as XLA custom calls (``jax.ffi``).

The extension ``rsjax/kernels/_onednn*.so`` (``csrc/onednn_conv.cc``, built at ``pip install``
when the oneDNN headers are there) computes, for NHWC ``x`` and a weights blob in oneDNN's
preferred layout,

    y = relu?( conv(x, W) + b  (+ r) )

in one primitive: bias through the convolution's bias argument, the residual ``r`` of a ResNet
block through a ``sum`` post-op (``r`` is aliased to the output), ReLU through an eltwise post-op;
float32, or bfloat16 activations and weights with float32 accumulation and a float32 bias.

Like BatchNorm folding (:mod:`rsjax.models.fold`) it is an inference-time rewrite that leaves the
Flax modules alone. :func:`onednn_model` (on a folded model) finds every convolution's problem
with one abstract evaluation, reorders each kernel once into the blob its primitive wants (the
``onednn`` variable collection) and returns an :class:`~rsjax.models.fold.InterceptedModel` whose
interceptor computes

- a ResNet ``BasicBlock`` / ``Bottleneck`` (:mod:`rsjax.models.resnet`) as its convolutions with
  the folded BN bias and ReLU fused, the projection shortcut a fused conv + bias, and the last
  convolution of the block taking the shortcut through the ``sum`` post-op and the block's ReLU;
- any other ``nn.Conv`` as a conv + bias (its own bias plus the folded BN bias that follows; that
  BN then passes its input through).

A convolution the extension cannot run (dilation, groups, a mask, a custom conv primitive,
another dtype, an input shape other than the one the blob was made for, a problem oneDNN has no
primitive for on this CPU, such as bfloat16 without AVX512-BF16) is computed by XLA with the
same arithmetic, and says so at ``logging.INFO`` (logger ``rsjax.kernels.onednn``). Noise,
argmax and counting stay in XLA; the custom call runs inside ``jit``, ``lax.scan`` and
``shard_map`` (each device calls it on its own shard).

Loading the library: the PyPI ``onednn`` wheel installs ``libdnnl.so`` and its SYCL/TBB runtime
into ``<prefix>/lib``, which is on no loader path; :func:`load` opens those libraries by full
path with ``RTLD_GLOBAL`` and points the OpenCL ICD loader and the SYCL unified runtime at the
CPU device of the ``intel-opencl-rt`` wheel (that build's CPU engine is a SYCL CPU device).
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys
from functools import lru_cache

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rsjax.errors import RsjaxError
from rsjax.models.fold import BN_EPS, InterceptedModel

log = logging.getLogger(__name__)

TARGET = "rsjax_onednn_conv"
COLLECTION = "onednn"
CHOICES = ("auto", "onednn", "xla")
NUM_PARAMS = 16  # the int64 problem array of csrc/onednn_conv.cc
_DTYPES = {jnp.dtype(jnp.float32): 0, jnp.dtype(jnp.bfloat16): 1}
# the runtime libraries libdnnl.so needs, in the wheel's lib directory (shortest name = soname)
_RUNTIME = ("libtbb.so.*", "libsvml.so", "libirng.so", "libimf.so", "libintlc.so.*", "libumf.so.*", "libhwloc.so.*",
            "libtcm.so.*", "libur_loader.so.*", "libOpenCL.so.*", "libsycl.so.*", "libdnnl.so.*")


# ------------------------------------------------------------------------------ the library

def _extension_path():
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_onednn*.so")))
    return found[0] if found else None


def _dnnl_dir():
    import importlib.metadata as md

    try:
        files = md.files("onednn") or []
    except md.PackageNotFoundError:
        files = []
    for f in files:
        if f.name.startswith("libdnnl.so"):
            return os.path.dirname(os.path.realpath(str(f.locate())))
    for d in (os.path.join(sys.prefix, "lib"),):
        if glob.glob(os.path.join(d, "libdnnl.so*")):
            return d
    return None


def _preload(libdir):
    """Open the runtime libraries by full path, global, retrying until their dependencies are met."""
    todo = []
    for pat in _RUNTIME:
        found = sorted(glob.glob(os.path.join(libdir, pat)), key=len)
        if found:
            todo.append(found[0])
    last = None
    while todo:
        progress = False
        for path in list(todo):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                todo.remove(path)
                progress = True
            except OSError as e:
                last = e
        if not progress:
            raise OSError(f"cannot load {', '.join(os.path.basename(p) for p in todo)}: {last}")


@lru_cache(maxsize=None)
def load():
    """``(lib, None)`` with the extension loaded and its FFI target registered, or ``(None, reason)``."""
    ext = _extension_path()
    if ext is None:
        return None, "the extension was not built (no oneDNN headers at install time; see docs/onednn.md)"
    libdir = _dnnl_dir()
    if libdir is None:
        return None, "the oneDNN library is not installed (pip install onednn)"
    try:
        _preload(libdir)
        icd = os.path.join(libdir, "libintelocl.so")
        if os.path.exists(icd):
            os.environ.setdefault("OCL_ICD_FILENAMES", icd)
        adapter = sorted(glob.glob(os.path.join(libdir, "libur_adapter_opencl.so*")), key=len)
        if adapter:
            os.environ.setdefault("UR_ADAPTERS_FORCE_LOAD", adapter[0])
        lib = ctypes.CDLL(ext)
    except OSError as e:
        return None, f"cannot load the oneDNN extension ({str(e)[:300]})"
    lib.rsjax_onednn_weights_bytes.restype = ctypes.c_int64
    lib.rsjax_onednn_time.restype = ctypes.c_double
    msg = ctypes.create_string_buffer(512)
    if lib.rsjax_onednn_init(msg, len(msg)) != 0:
        return None, f"oneDNN has no CPU engine here ({msg.value.decode(errors='replace')})"
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.RsjaxOnednnConv), platform="cpu")
    return lib, None


def available() -> bool:
    """Whether the extension is built, its library loads and a CPU engine exists."""
    return load()[0] is not None


_said = set()


def resolve(choice: str = "auto", platform: str | None = None) -> bool:
    """Whether to route convolutions to oneDNN for ``--cpu-kernels choice``.

    ``xla``: never. ``onednn``: yes, or RsjaxError when the extension is unavailable.
    ``auto``: on a CPU backend when the extension is available; when it is not, says why once
    (stderr) and uses XLA.
    """
    if choice not in CHOICES:
        raise RsjaxError(f"cpu kernels must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "xla":
        return False
    platform = platform or jax.default_backend()
    lib, reason = load()
    if choice == "onednn":
        if platform != "cpu":
            raise RsjaxError(f"--cpu-kernels onednn needs the CPU backend, this one is {platform}")
        if lib is None:
            raise RsjaxError(f"--cpu-kernels onednn: {reason}")
        return True
    if platform != "cpu":
        return False
    if lib is None and reason not in _said:
        _said.add(reason)
        print(f"rsjax: oneDNN CPU kernels unavailable: {reason}; using XLA's convolutions", file=sys.stderr)
    return lib is not None


# ------------------------------------------------------------------------------ one convolution

def _pairs(pad, kh, kw, strides, in_hw):
    """Explicit ((top, bottom), (left, right)) padding of an nn.Conv padding spec."""
    if isinstance(pad, str):
        if pad == "VALID":
            return ((0, 0), (0, 0))
        if pad == "SAME":
            out = []
            for k, s, n in zip((kh, kw), strides, in_hw):
                total = max((-(-n // s) - 1) * s + k - n, 0)
                out.append((total // 2, total - total // 2))
            return tuple(out)
        return None
    if isinstance(pad, int):
        return ((pad, pad), (pad, pad))
    pad = tuple(pad)
    if len(pad) != 2:
        return None
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in pad)


def conv_problem(mod, x_shape, dtype, *, relu=False, residual=False, bias=False):
    """``(params, None)``: the int64 problem array of ``mod`` (an nn.Conv) on NHWC input of
    ``x_shape`` with the given epilogue, or ``(None, reason)`` when the extension cannot run it."""
    dtype = jnp.dtype(dtype)
    if dtype not in _DTYPES:
        return None, f"dtype {dtype}"
    if len(x_shape) != 4:
        return None, f"{len(x_shape)}-d input"
    ks = tuple(mod.kernel_size)
    if len(ks) != 2:
        return None, f"kernel size {ks}"
    strides = mod.strides if mod.strides is not None else 1
    strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
    dil = mod.kernel_dilation if mod.kernel_dilation is not None else 1
    in_dil = mod.input_dilation if mod.input_dilation is not None else 1
    if dil not in (1, (1, 1)) or in_dil not in (1, (1, 1)):
        return None, "dilation"
    if mod.feature_group_count != 1 or mod.mask is not None:
        return None, "grouped or masked convolution"
    if getattr(mod, "conv_general_dilated", None) is not None or getattr(mod, "conv_general_dilated_cls", None):
        return None, "a custom convolution primitive"
    pads = _pairs(mod.padding, ks[0], ks[1], strides, x_shape[1:3])
    if pads is None or any(p < 0 for pp in pads for p in pp):
        return None, f"padding {mod.padding!r}"
    _, h, w, c = x_shape
    params = (_DTYPES[dtype], h, w, c, mod.features, ks[0], ks[1], strides[0], strides[1], pads[0][0], pads[0][1],
              pads[1][0], pads[1][1], int(relu), int(residual), int(bias))
    oh = (h + pads[0][0] + pads[0][1] - ks[0]) // strides[0] + 1
    ow = (w + pads[1][0] + pads[1][1] - ks[1]) // strides[1] + 1
    if oh < 1 or ow < 1:
        return None, "empty output"
    return params, None


def _out_shape(params, n):
    _, h, w, _, o, kh, kw, sh, sw, pt, pb, pl, pr = params[:13]
    return (n, (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1, o)


def onednn_conv(x, blob, bias, residual, params):
    """The fused convolution ``relu?(conv(x) + bias (+ residual))`` through the extension."""
    out = jax.ShapeDtypeStruct(_out_shape(params, x.shape[0]), x.dtype)
    if bias is None:
        bias = jnp.zeros((0,), jnp.float32)
    aliases = {}
    if residual is None:
        residual = jnp.zeros((0,), x.dtype)
    else:
        aliases = {3: 0}
    names = ("kh", "kw", "sh", "sw", "pt", "pb", "pl", "pr", "relu", "sum", "has_bias")
    attrs = {k: np.int64(v) for k, v in zip(names, params[5:])}
    call = jax.ffi.ffi_call(TARGET, out, input_output_aliases=aliases)
    return call(x, blob, bias.astype(jnp.float32), residual.astype(x.dtype), **attrs)


def xla_conv(x, kernel, bias, residual, params, precision=None):
    """The same function as :func:`onednn_conv` in XLA (the fallback)."""
    pads = ((params[9], params[10]), (params[11], params[12]))
    y = lax.conv_general_dilated(x, kernel.astype(x.dtype), (params[7], params[8]), pads,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    if residual is not None:
        y = y + residual.astype(y.dtype)
    return nn.relu(y) if params[13] else y


def has_primitive(params):
    """Whether oneDNN can create the primitive of ``params`` on this CPU (bfloat16, for one, needs
    AVX512-BF16 or AVX2-VNNI-2); cached per problem."""
    return _has_primitive(tuple(int(v) for v in params))


@lru_cache(maxsize=None)
def _has_primitive(params):
    lib, _ = load()
    if lib is None:
        return False
    msg = ctypes.create_string_buffer(512)
    return lib.rsjax_onednn_weights_bytes((ctypes.c_int64 * NUM_PARAMS)(*params), msg, len(msg)) >= 0


def prepare_blob(params, kernel):
    """The HWIO ``kernel`` reordered (and cast) into the blob the primitive of ``params`` reads (uint8)."""
    lib, reason = load()
    if lib is None:
        raise RsjaxError(f"oneDNN kernels: {reason}")
    p = (ctypes.c_int64 * NUM_PARAMS)(*params)
    msg = ctypes.create_string_buffer(512)
    size = lib.rsjax_onednn_weights_bytes(p, msg, len(msg))
    if size < 0:
        raise RsjaxError(f"oneDNN: no primitive for {params}: {msg.value.decode(errors='replace')}")
    w = np.ascontiguousarray(np.asarray(kernel, np.float32))
    blob = np.zeros(size, np.uint8)
    if lib.rsjax_onednn_prepare_weights(p, w.ctypes.data_as(ctypes.c_void_p), blob.ctypes.data_as(ctypes.c_void_p),
                                        msg, len(msg)) != 0:
        raise RsjaxError(f"oneDNN: cannot reorder weights for {params}: {msg.value.decode(errors='replace')}")
    return blob


def primitive_info(params, n):
    """The implementation oneDNN runs for ``params`` at batch ``n`` (e.g. ``brg_conv_fwd:avx512_core_bf16``)."""
    lib, reason = load()
    if lib is None:
        return f"unavailable: {reason}"
    out = ctypes.create_string_buffer(256)
    lib.rsjax_onednn_impl((ctypes.c_int64 * NUM_PARAMS)(*params), ctypes.c_int64(n), out, len(out))
    return out.value.decode(errors="replace")


def primitive_time(params, n, reps=5):
    """benchdnn-style: the best of ``reps`` executions of the primitive alone (seconds), no JAX."""
    lib, reason = load()
    if lib is None:
        raise RsjaxError(f"oneDNN kernels: {reason}")
    return lib.rsjax_onednn_time((ctypes.c_int64 * NUM_PARAMS)(*params), ctypes.c_int64(n), int(reps))


# ------------------------------------------------------------------------------ the interceptor

def _resnet_blocks():
    from rsjax.models.resnet import BasicBlock, Bottleneck

    return (BasicBlock, Bottleneck)


def _block_plan(mod, x_shape):
    """The convolutions of a ResNet block as ``[(name, input, relu, residual)]`` (rsjax.models.resnet):
    inputs are names of earlier outputs (``"x"`` the block input); the shortcut ``"r"`` is the
    block input or the downsample conv's output."""
    from rsjax.models.resnet import BasicBlock

    s = mod.strides
    proj = s != 1 or x_shape[-1] != mod.filters * mod.expansion
    if isinstance(mod, BasicBlock):
        plan = [("conv1", (3, 3), s, 1, "x", True, None), ("conv2", (3, 3), 1, 1, "conv1", True, "r")]
    else:
        plan = [("conv1", (1, 1), 1, 0, "x", True, None), ("conv2", (3, 3), s, 1, "conv1", True, None),
                ("conv3", (1, 1), 1, 0, "conv2", True, "r")]
    feats = {"conv1": mod.filters, "conv2": mod.filters, "conv3": mod.filters * mod.expansion}
    if isinstance(mod, BasicBlock):
        feats["conv2"] = mod.filters * mod.expansion
    out = []
    if proj:
        out.append(("downsample_conv", nn.Conv(mod.filters * mod.expansion, (1, 1), (s, s), padding="VALID",
                                               use_bias=False, parent=None), "x", False, None))
    for name, k, st, p, src, relu, res in plan:
        out.append((name, nn.Conv(feats[name], k, (st, st), padding=((p, p), (p, p)), use_bias=False, parent=None),
                    src, relu, res))
    return out, proj


class _Router:
    """The interceptor's state: the problem of every routed convolution (path -> params), found by
    an abstract evaluation (``discover=True``) and then fixed, and which layers fell back."""

    def __init__(self, folded_paths, eps=BN_EPS):
        self.folded = frozenset(folded_paths)
        self.eps = eps
        self.problems = {}
        self.discover = False
        self.no_primitive = 0  # convolutions left to XLA because this CPU has no oneDNN primitive for them

    def _bn_bias(self, mod, conv_name):
        bn = {"downsample_conv": "downsample_bn"}.get(conv_name, "bn" + conv_name[4:])
        path = tuple(mod.path) + (bn,)
        if path not in self.folded:
            return None, path
        return mod.variables["params"][bn]["bias"], path

    def conv(self, path, conv_mod, x, kernel, bias, residual, relu, dtype, blobs, precision=None):
        """One convolution: the extension where its problem is known and matches, else XLA."""
        params, why = conv_problem(conv_mod, x.shape, dtype, relu=relu, residual=residual is not None,
                                   bias=bias is not None)
        if self.discover:
            if params is not None and not has_primitive(params):
                params, why = None, "oneDNN has no primitive for it on this CPU (e.g. bfloat16 without AVX512-BF16)"
                self.no_primitive += 1
            if params is not None:
                self.problems[path] = params
            else:
                log.info("oneDNN: %s runs in XLA (%s)", "/".join(path), why)
        elif params is not None and self.problems.get(path) == params and blobs is not None:
            return onednn_conv(x, blobs, bias, residual, params)
        elif path in self.problems or params is not None:
            log.info("oneDNN: %s runs in XLA (input %s differs from the prepared %s)", "/".join(path),
                     tuple(x.shape), self.problems.get(path))
        params = params or conv_problem(conv_mod, x.shape, jnp.float32)[0]
        if params is None:  # not expressible as a plain conv at all: leave it to Flax
            return None
        return xla_conv(x.astype(dtype), kernel, bias, residual,
                        params[:13] + (int(relu), 0, 0), precision)

    def block(self, mod, x):
        plan, _ = _block_plan(mod, x.shape)
        dtype = jnp.dtype(mod.conv.keywords.get("dtype") or jnp.float32)
        x = x.astype(dtype)
        vs = mod.variables
        values = {"x": x, "r": x}
        for name, cm, src, relu, res in plan:
            bias, bn_path = self._bn_bias(mod, name)
            if bias is None:
                raise ValueError(f"oneDNN blocks need folded BatchNorms; {'/'.join(bn_path)} is not folded")
            blob = vs.get(COLLECTION, {}).get(name, {}).get("blob")
            y = self.conv(tuple(mod.path) + (name,), cm, values[src], vs["params"][name]["kernel"], bias,
                          values[res] if res else None, relu, dtype, blob)
            values[name] = y
            if name == "downsample_conv":
                values["r"] = y
        return values[plan[-1][0]]

    def interceptor(self):
        blocks = _resnet_blocks()

        def intercept(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name != "__call__" or len(args) != 1 or kwargs:
                return next_fun(*args, **kwargs)
            x = args[0]
            if isinstance(mod, blocks) and all(
                    tuple(mod.path) + (bn,) in self.folded for bn in ("bn1", "bn2")):
                return self.block(mod, x)
            if isinstance(mod, nn.Conv) and getattr(x, "ndim", 0) == 4:
                parent = mod.scope.parent  # the module holding this conv and its BN
                name = mod.name
                bias = mod.get_variable("params", "bias") if mod.use_bias else None
                bn = {"downsample_conv": "downsample_bn"}.get(name, "bn" + name[4:] if name.startswith("conv") else "")
                bn_path = tuple(mod.path[:-1]) + (bn,)
                bn_bias = None
                if bn and bn_path in self.folded:
                    bn_bias = parent.get_variable("params", bn)["bias"] if parent is not None else None
                    if bn_bias is None:
                        return next_fun(*args, **kwargs)
                    bias = bn_bias if bias is None else bias + bn_bias
                dtype = jnp.dtype(mod.dtype or jnp.result_type(x, mod.get_variable("params", "kernel")))
                blob = mod.get_variable(COLLECTION, "blob") if mod.has_variable(COLLECTION, "blob") else None
                y = self.conv(tuple(mod.path), mod, x, mod.get_variable("params", "kernel"), bias, None, False,
                              dtype, blob, mod.precision)
                if y is None:  # not a plain convolution: Flax computes it, plus the folded BN's bias
                    y = next_fun(*args, **kwargs)
                    return y if bn_bias is None else y + bn_bias.astype(y.dtype)
                return y
            if isinstance(mod, nn.BatchNorm) and tuple(mod.path) in self.folded:
                if mod.epsilon != self.eps:
                    raise ValueError(f"BN {'/'.join(mod.path)} has epsilon {mod.epsilon}, folded with {self.eps}")
                return x  # its bias went into the convolution before it (conv_bn_pairs: a sibling)
            return next_fun(*args, **kwargs)

        return intercept


class OnednnModel(InterceptedModel):
    """``module`` (folded) with its convolutions computed by oneDNN: ``.apply(onednn_variables, x)``."""

    def __init__(self, module, router):
        self.router = router
        super().__init__(module, router.interceptor())

    def __repr__(self):
        return f"OnednnModel({type(self.module).__name__}, {len(self.router.problems)} oneDNN convolutions)"


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def onednn_model(module, variables, input_shape, *, folded_paths=frozenset(), eps=BN_EPS):
    """Route ``module``'s convolutions to oneDNN (module doc). ``module`` is the bare Flax module,
    ``variables`` its folded variables (:func:`rsjax.models.fold.fold_variables`) and
    ``folded_paths`` the folded BNs; ``input_shape`` is (H, W, C). Returns ``(model, variables')``
    with ``variables'`` holding the weight blobs in an ``onednn`` collection; ``model.apply`` equals
    the folded model's up to float rounding."""
    router = _Router(folded_paths, eps)
    model = OnednnModel(module, router)
    router.discover = True
    try:
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1,) + tuple(input_shape), jnp.float32)), variables)
    finally:
        router.discover = False
    params_tree = variables["params"]
    blobs = {}
    for path, params in router.problems.items():
        _set(blobs, path + ("blob",), jnp.asarray(prepare_blob(params, np.asarray(_get(params_tree, path)["kernel"]))))
    out = dict(variables)
    out[COLLECTION] = blobs
    log.info("oneDNN: %d convolutions routed", len(router.problems))
    if router.no_primitive:
        print(f"rsjax: oneDNN has no primitive on this CPU for {router.no_primitive} of "
              f"{router.no_primitive + len(router.problems)} convolutions (bfloat16 needs AVX512-BF16 or "
              f"AVX2-VNNI-2); they run in XLA", file=sys.stderr)
    return model, out


__all__ = ["CHOICES", "COLLECTION", "OnednnModel", "available", "conv_problem", "has_primitive", "load", "onednn_classifier", "onednn_conv",
           "onednn_model",
           "prepare_blob", "primitive_info", "primitive_time", "resolve", "xla_conv"]


def onednn_classifier(arch, num_classes, variables, mean, std, *, dtype="float32", folded_paths=frozenset()):
    """``f`` with ``logits = f(x) = net((x - mean) / std)`` (float32 NHWC ``x`` in [0, 1]) whose
    convolutions run in oneDNN; ``variables`` are folded (:func:`rsjax.models.fold.fold_variables`).
    ``f.apply(f.variables, x)`` and ``f.variables`` (with the weight blobs) as for
    :func:`rsjax.classifier.load_classifier`."""
    from rsjax.models import build_model, input_shape

    module = build_model(arch, num_classes, dtype=jnp.dtype(dtype))
    model, variables = onednn_model(module, variables, input_shape(arch), folded_paths=folded_paths)
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)

    @jax.jit
    def apply(w, x):
        x = (jnp.asarray(x, jnp.float32) - mean) / std
        return model.apply(w, x, train=False).astype(jnp.float32)

    def f(x):
        return apply(variables, x)

    f.apply, f.variables = apply, variables
    return f
