"""Converted classifiers on disk: ``save_classifier`` / ``load_classifier``.

A converted model is a directory holding

- ``variables/``: an orbax checkpoint of the Flax variables ``{'params': ..., 'batch_stats': ...}``
  of ``rsjax.models.build_model(arch, num_classes)``;
- ``rsjax_model.json``: metadata: ``arch``, ``dataset``, ``num_classes``, ``input_shape`` [H, W, C],
  ``normalization`` (``meanstd`` | ``center`` | ``none``), ``mean``, ``std``, ``sigma`` (training
  sigma or null), and provenance (``source``, ``source_sha256``, ``source_format``,
  ``converter_version``). It is written last, so its presence marks a complete model.

``load_classifier`` returns ``f`` with ``f(x) = net((x - mean) / std)``: ``x`` is float32
``(B, H, W, C)`` in [0, 1]. For ``center`` std is 1, for ``none`` mean is 0 and std 1.
"""

import json
import shutil
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

from rsjax.errors import RsjaxError

META_FILE = "rsjax_model.json"
VARIABLES_DIR = "variables"
_REQUIRED = ("arch", "dataset", "num_classes", "input_shape", "mean", "std")
_DTYPES = ("float32", "bfloat16")


def save_classifier(out_dir, variables, meta, *, overwrite=False):
    """Write ``variables`` (nested dict of arrays) and ``meta`` to the directory ``out_dir``.

    ``meta`` needs at least arch, dataset, num_classes, input_shape, mean, std; ``sigma`` and
    ``normalization`` default to None and to what mean/std imply.
    """
    import orbax.checkpoint as ocp

    from rsjax.models import ARCHS

    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise RsjaxError(f"model metadata lacks {', '.join(missing)}")
    if meta["arch"] not in ARCHS:
        raise RsjaxError(f"unknown architecture {meta['arch']!r}; known: {', '.join(ARCHS)}")
    meta = dict(meta)
    meta.setdefault("sigma", None)
    meta.setdefault("normalization", _normalization_of(meta["mean"], meta["std"]))
    meta["format_version"] = 1
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise RsjaxError(f"{out_dir}: exists and is not empty (pass overwrite=True to replace a converted model)")
        if not (out_dir / META_FILE).is_file():
            raise RsjaxError(f"{out_dir}: not an rsjax model directory; refusing to overwrite it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tree = _to_numpy_tree(variables)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(out_dir / VARIABLES_DIR, tree)
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def read_meta(path):
    """The metadata dict of a converted model directory (RsjaxError if it is not one)."""
    path = Path(path).expanduser().resolve()
    meta_file = path / META_FILE
    if not path.is_dir():
        raise RsjaxError(f"{path}: no such model directory (convert a checkpoint with `rsjax convert`)")
    if not meta_file.is_file() or not (path / VARIABLES_DIR).is_dir():
        raise RsjaxError(f"{path}: not a converted rsjax model (no {META_FILE} and {VARIABLES_DIR}/; "
                         f"make one with `rsjax convert`)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise RsjaxError(f"{meta_file}: unreadable metadata ({e})") from None
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise RsjaxError(f"{meta_file}: metadata lacks {', '.join(missing)}")
    return meta


def load_classifier(path, *, dtype="float32", fold_bn=True, pack_narrow=None, cpu_kernels="xla"):
    """Load a converted model: ``(f, meta)`` with ``logits = f(x)``.

    ``x``: float32 ``(B, H, W, C)`` in [0, 1]; logits: float32 ``(B, num_classes)``. ``f`` is pure
    and jit-compatible; the normalisation is inside. ``dtype="bfloat16"`` computes the network in
    bfloat16 (weights stored float32, logits returned float32). ``fold_bn=True`` (default) folds
    each BatchNorm into the preceding convolution (:mod:`rsjax.models.fold`): the same function up
    to float rounding (logits within 1e-6 in float32), faster; ``fold_bn=False`` evaluates the
    network exactly as converted. ``pack_narrow`` computes narrow 3x3 convolutions width-packed
    (:mod:`rsjax.models.pack`, after folding; the same function up to float rounding); ``None`` (default) packs
    where that was measured to be faster: a folded model with :func:`rsjax.xla.pack_narrow_convs`.

    ``f.variables`` (the Flax variables), ``f.apply(variables, x)`` (the same function with the
    weights passed explicitly, preferable inside a large jit) and ``f.meta`` are attached.

    ``cpu_kernels`` (``auto`` | ``onednn`` | ``xla``) routes the convolutions, with their folded
    BatchNorm, bias, ReLU and residual sum, to oneDNN on a CPU (:mod:`rsjax.kernels.onednn`, instead of
    packing); recorded as ``meta["cpu_kernels"]``.
    """
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from rsjax.models import ARCHS, build_model, input_shape

    if dtype not in _DTYPES:
        raise RsjaxError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    path = Path(path).expanduser().resolve()
    meta = read_meta(path)
    arch = meta["arch"]
    if arch not in ARCHS:
        raise RsjaxError(f"{path}: unknown architecture {arch!r} in {META_FILE}")
    target = jax.eval_shape(lambda: build_model(arch, int(meta["num_classes"])).init(
        jax.random.PRNGKey(0), jnp.zeros((1,) + input_shape(arch))))
    target = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), dict(target))
    try:
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(path / VARIABLES_DIR, target)
    except Exception as e:  # noqa: BLE001 - one line for any corrupt/mismatching checkpoint
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RsjaxError(f"{path}: cannot restore the variables ({type(e).__name__}: {first[:200]})") from None
    variables = jax.device_put(restored)
    folded = frozenset()
    if fold_bn:
        from rsjax.models.fold import fold_variables

        variables, folded = fold_variables(variables)
    from rsjax.kernels.onednn import resolve

    onednn = resolve(cpu_kernels)
    if onednn:
        pack_narrow = False
    if pack_narrow is None:
        from rsjax.xla import pack_narrow_convs

        pack_narrow = pack_narrow_convs(folded=bool(folded))
    packed = frozenset()
    if pack_narrow:
        from rsjax.models.pack import pack_variables

        variables, packed = pack_variables(variables)
    meta = dict(meta, dtype=dtype, fold_bn=bool(folded), pack_narrow=bool(packed),
                cpu_kernels="onednn" if onednn else "xla")
    if onednn:
        from rsjax.kernels.onednn import onednn_classifier

        f = onednn_classifier(arch, int(meta["num_classes"]), variables, meta["mean"], meta["std"], dtype=dtype,
                              folded_paths=folded)
        f.meta = meta
        return f, meta

    apply = _jitted_apply(arch, int(meta["num_classes"]), dtype,
                          tuple(float(m) for m in meta["mean"]), tuple(float(s) for s in meta["std"]), folded,
                          packed)

    def f(x):
        return apply(variables, x)

    f.variables = variables
    f.apply = apply
    f.meta = meta
    return f, meta


@lru_cache(maxsize=None)
def _jitted_apply(arch, num_classes, dtype, mean, std, folded=frozenset(), packed=frozenset()):
    """One jitted ``apply(variables, x)`` per (architecture, dtype, normalisation, folded BNs, layout), so
    that models of the same architecture loaded in one process share their compiled code."""
    import jax
    import jax.numpy as jnp

    from rsjax.models import build_model

    model = build_model(arch, num_classes, dtype=jnp.dtype(dtype))
    if folded:
        from rsjax.models.fold import FoldedModel

        model = FoldedModel(model, folded)
    if packed:
        from rsjax.models.pack import PackedModel

        model = PackedModel(model, packed)
    return jax.jit(partial(_apply, model, np.asarray(mean, np.float32), np.asarray(std, np.float32)))


def _apply(model, mean, std, variables, x):
    """logits = model((x - mean) / std) in the model's dtype, returned as float32."""
    import jax.numpy as jnp

    x = (jnp.asarray(x, jnp.float32) - mean) / std
    return model.apply(variables, x, train=False).astype(jnp.float32)


def _normalization_of(mean, std):
    if all(m == 0 for m in mean) and all(s == 1 for s in std):
        return "none"
    if all(s == 1 for s in std):
        return "center"
    return "meanstd"


def _to_numpy_tree(tree):
    if hasattr(tree, "items"):
        return {str(k): _to_numpy_tree(v) for k, v in tree.items()}
    return np.asarray(tree)
