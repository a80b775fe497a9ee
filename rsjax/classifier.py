"""Converted classifiers on disk: ``save_classifier`` / ``load_classifier``.

A converted model is a directory holding

- ``variables/``: an orbax checkpoint of the Flax variables ``{'params': ..., 'batch_stats': ...}``
  of ``rsjax.models.build_model(arch, num_classes)``;
- ``rsjax_model.json``: metadata: ``arch``, ``dataset``, ``num_classes``, ``input_shape`` [H, W, C],
  ``normalization`` (``meanstd`` | ``center`` | ``none``), ``mean``, ``std``, ``sigma`` (training
  sigma or null), and provenance (``source``, ``source_sha256``, ``source_format``,
  ``converter_version``). It is written last, so its presence marks a complete model.

  ``variables_sha256`` (:func:`variables_sha256` of the variables, written by :func:`save_classifier`).

``load_classifier`` returns a :class:`Classifier` (it unpacks as ``f, meta``) with
``f(x) = net((x - mean) / std)``: ``x`` is float32 ``(B, H, W, C)`` in [0, 1]. For ``center`` std
is 1, for ``none`` mean is 0 and std 1. Loading verifies the checksum (when the metadata has one:
older conversions load without) and that every variable is finite; either failing is a
:class:`rsjax.errors.CheckpointError` naming the problem, never a certificate.

:func:`classifier_from_variables` is the one factory from (architecture, variables, metadata) to a
classifier, used by :func:`load_classifier`, the benchmarks and the training code.
"""

import dataclasses
import hashlib
import json
import shutil
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from rsjax.errors import CheckpointError, RsjaxError

META_FILE = "rsjax_model.json"
VARIABLES_DIR = "variables"
_REQUIRED = ("arch", "dataset", "num_classes", "input_shape", "mean", "std")
_DTYPES = ("float32", "bfloat16")


def _local_checkpointer():
    """An orbax checkpointer that reads or writes host numpy arrays from this process alone.

    A model directory holds host arrays, written by one process (``rsjax train``'s process 0 in a
    ``jax.distributed`` job) or read by each on its own; orbax's default multi-process barriers
    would wait for processes that never join, so the active set is this process only."""
    import jax
    import orbax.checkpoint as ocp

    if jax.process_count() == 1:
        return ocp.StandardCheckpointer()
    k = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=k, active_processes={k}, barrier_sync_key_prefix=f"rsjax_local_{k}"))


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
    tree = _to_numpy_tree(variables)
    bad = nonfinite_leaves(tree)
    if bad:
        raise RsjaxError(f"variables {', '.join(bad[:3])} hold NaN or infinite values; refusing to save them")
    meta["variables_sha256"] = variables_sha256(tree)
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise RsjaxError(f"{out_dir}: exists and is not empty (pass overwrite=True to replace a converted model)")
        if not (out_dir / META_FILE).is_file():
            raise RsjaxError(f"{out_dir}: not an rsjax model directory; refusing to overwrite it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _local_checkpointer() as ckpt:
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


def _leaves(tree, prefix=""):
    """(path, array) of every leaf of a nested dict, sorted by path ('params/conv1/kernel')."""
    if hasattr(tree, "items"):
        out = []
        for k in sorted(tree, key=str):
            out += _leaves(tree[k], f"{prefix}/{k}" if prefix else str(k))
        return out
    return [(prefix, np.asarray(tree))]


def variables_sha256(variables) -> str:
    """sha256 (hex) of the variables: every leaf in path order, as its path, dtype, shape and
    little-endian bytes, so any changed value, shape or name changes it."""
    h = hashlib.sha256()
    for path, a in _leaves(variables):
        a = np.ascontiguousarray(a)
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        h.update(f"{path}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def nonfinite_leaves(variables) -> list:
    """Paths of the floating-point leaves holding a NaN or an infinity."""
    return [p for p, a in _leaves(variables)
            if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all()]


@dataclasses.dataclass(frozen=True, eq=False)
class Classifier:
    """A base classifier ``logits = f(x)`` with its metadata; unpacks as ``f, meta``.

    ``f`` is pure and jit-compatible (``x`` float32 (B, H, W, C) in [0, 1], logits float32
    (B, K)); calling the classifier calls ``f``. ``checksum`` is the sha256 of the variables as
    stored (None for a classifier not loaded from disk). ``variables`` / ``apply`` are ``f``'s
    (``apply(variables, x) == f(x)``), None for a plain function.
    """

    f: Callable
    meta: dict
    checksum: Optional[str] = None

    def __iter__(self):
        return iter((self.f, self.meta))

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return (self.f, self.meta)[i]

    def __call__(self, x):
        return self.f(x)

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def input_shape(self) -> tuple:
        return tuple(int(v) for v in self.meta["input_shape"])

    @property
    def variables(self):
        return getattr(self.f, "variables", None)

    @property
    def apply(self):
        return getattr(self.f, "apply", None)


def classifier_from_variables(arch, variables, meta, *, dtype="float32", fold=True, pack=False,
                              cpu_kernels="xla", checksum=None) -> Classifier:
    """The classifier ``f(x) = net((x - mean) / std)`` of ``arch`` with ``variables`` (Flax
    ``{'params', 'batch_stats'}``) and ``meta`` (num_classes, input_shape, mean, std, ...).

    ``dtype="bfloat16"`` computes the network in bfloat16 (logits returned float32). ``fold``
    folds each BatchNorm into the preceding convolution (:mod:`rsjax.models.fold`: the same
    function up to float rounding). ``pack`` computes narrow 3x3 convolutions width-packed
    (:mod:`rsjax.models.pack`, after folding; the same function up to float rounding); whether
    that is faster depends on the XLA settings: :func:`rsjax.xla.pack_narrow_convs` says.
    ``cpu_kernels`` (``auto`` | ``onednn`` | ``xla``) routes the convolutions, with their folded
    BatchNorm, bias, ReLU and residual sum, to oneDNN on a CPU (:mod:`rsjax.kernels.onednn`;
    replaces packing); the choice is recorded as ``meta["cpu_kernels"]``.
    ``f.variables``, ``f.apply(variables, x)`` (one jitted function per architecture, dtype,
    normalisation and layout, shared by every model of that kind) and ``f.meta`` are attached.
    """
    import jax

    from rsjax.models import ARCHS

    if dtype not in _DTYPES:
        raise RsjaxError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if arch not in ARCHS:
        raise RsjaxError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    variables = jax.device_put(variables)
    folded = packed = frozenset()
    if fold:
        from rsjax.models.fold import fold_variables

        variables, folded = fold_variables(variables)
    from rsjax.kernels.onednn import resolve

    onednn = resolve(cpu_kernels)
    if pack and folded and not onednn:
        from rsjax.models.pack import pack_variables

        variables, packed = pack_variables(variables)
    meta = dict(meta, arch=arch, dtype=dtype, fold_bn=bool(folded), pack_narrow=bool(packed),
                cpu_kernels="onednn" if onednn else "xla")
    if onednn:
        from rsjax.kernels.onednn import onednn_classifier

        f = onednn_classifier(arch, int(meta["num_classes"]), variables, meta["mean"], meta["std"], dtype=dtype,
                              folded_paths=folded)
        f.meta = meta
        return Classifier(f, meta, checksum)
    apply = _jitted_apply(arch, int(meta["num_classes"]), dtype,
                          tuple(float(m) for m in meta["mean"]), tuple(float(s) for s in meta["std"]), folded,
                          packed)

    def f(x):
        return apply(variables, x)

    f.variables, f.apply, f.meta = variables, apply, meta
    return Classifier(f, meta, checksum)


def load_classifier(path, *, dtype="float32", fold_bn=True, pack_narrow=False, cpu_kernels="xla") -> Classifier:
    """Load a converted model: a :class:`Classifier` (``f, meta = load_classifier(path)`` works).

    ``x``: float32 ``(B, H, W, C)`` in [0, 1]; logits: float32 ``(B, num_classes)``; the
    normalisation is inside. ``dtype``, ``fold_bn`` and ``pack_narrow`` as ``dtype``, ``fold`` and
    ``pack`` of :func:`classifier_from_variables`, ``cpu_kernels`` as there (packing needs folding; ``rsjax certify`` packs
    where :func:`rsjax.xla.pack_narrow_convs` says it is faster). The variables' checksum
    (``variables_sha256`` in the metadata, when present) and their finiteness are verified:
    :class:`CheckpointError` otherwise.
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
        with _local_checkpointer() as ckpt:
            restored = ckpt.restore(path / VARIABLES_DIR, target)
    except Exception as e:  # noqa: BLE001 - one line for any corrupt/mismatching checkpoint
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RsjaxError(f"{path}: cannot restore the variables ({type(e).__name__}: {first[:200]})") from None
    host = jax.tree_util.tree_map(np.asarray, restored)
    checksum = variables_sha256(host)
    want = meta.get("variables_sha256")
    if want is not None and want != checksum:
        raise CheckpointError(f"{path}: the variables do not match their checksum (variables_sha256 in {META_FILE}): "
                              f"the model files are damaged; convert the checkpoint again")
    bad = nonfinite_leaves(host)
    if bad:
        raise CheckpointError(f"{path}: variables {', '.join(bad[:3])} hold NaN or infinite values")
    return classifier_from_variables(arch, host, meta, dtype=dtype, fold=fold_bn, pack=pack_narrow,
                                     cpu_kernels=cpu_kernels, checksum=checksum)


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
