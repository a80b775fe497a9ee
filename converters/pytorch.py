"""Convert PyTorch smoothing checkpoints into rsjax models (Flax variables + metadata).

Pipeline (:func:`convert_checkpoint`):

1. :func:`read_checkpoint`: ``torch.load(map_location="cpu", weights_only=True)``, which never
   runs code from the file. Data-only globals that genuine checkpoints pickle (numpy scalars and
   dtypes, often stored as ``best_acc``; ``argparse.Namespace``, the training arguments some
   scripts save) are allowed through ``torch.serialization.safe_globals``. Any other global is a
   :class:`CheckpointError` naming it and the opt-in ``trust=True`` (``--trust-checkpoint``),
   which loads with ``weights_only=False`` and so runs arbitrary code from the file. Unreadable,
   empty, truncated or non-pickle files raise :class:`CheckpointError` with one line.
2. :func:`find_state_dict`: the container format:

   - ``cohen``: ``{'epoch', 'arch', 'state_dict', 'optimizer'}``, keys prefixed ``1.`` (Sequential
     of a stateless NormalizeLayer and the net) or ``1.module.`` (DataParallel), sometimes with a
     leading ``module.``. Normalisation: the dataset's mean/std from :data:`rsjax.data.DATASET_INFO`
     (none for MNIST, see COHEN_NORMALIZATION).
   - ``smoothadv`` (Salman et al.): the same container; NormalizeLayer *or* InputCenterLayer,
     which the file does not record. Chosen when the path names SmoothAdv-style training
     (``PGD_2steps``, ``DDN_4steps``, ``smoothadv``, ``smoothing-adversarial``). Auto normalisation is mean/std
     with a warning; pass ``normalization="center"`` for InputCenterLayer models.
   - ``macer``: ``{'net': state_dict, 'epoch'}``, unprefixed keys, no normalisation.
   - ``torchvision``: a bare state dict (tensor values only); dataset mean/std normalisation.

   A normaliser that stored its constants as buffers (``0.means``/``0.sds``, ...) is used as is.
3. :func:`strip_prefix`: an optional ``module.``, then ``1.``, then ``module.``.
4. :func:`detect_arch`: from the tensors (stem shape, Basic/Bottleneck blocks, blocks per stage);
   the file's ``arch`` string must agree when it names an rsjax architecture.
5. :func:`torch_to_flax`: strict mapping onto the Flax tree of :mod:`rsjax.models`: every source
   tensor is used exactly once (``num_batches_tracked`` ignored), every shape is checked, every
   value must be finite (a NaN or inf is an error naming the key);
   conv OIHW -> HWIO, linear ``[out, in]`` -> ``[in, out]``, BN weight/bias/running_mean/
   running_var -> scale/bias/mean/var.
6. :func:`rsjax.classifier.save_classifier`.
"""

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from rsjax.data import DATASET_INFO
from rsjax.errors import CheckpointError, RsjaxError

CONVERTER_VERSION = "rsjax-convert/1"
FORMATS = ("cohen", "macer", "smoothadv", "torchvision")
NORMALIZATIONS = ("auto", "meanstd", "center", "none")

# normaliser of Cohen-style models per dataset (mean/std from rsjax.data.DATASET_INFO); the real
# MNIST LeNet reproduces its PyTorch accuracy with an identity normaliser
COHEN_NORMALIZATION = {"cifar10": "meanstd", "imagenet": "meanstd", "mnist": "none"}

_SMOOTHADV_PATH = re.compile(r"(?<![a-z])(?:pgd|ddn)_?\d+_?steps?|smoothadv|smoothing[-_]adversarial", re.IGNORECASE)
_IGNORED_SUFFIX = "num_batches_tracked"


def _short(items, k=6):
    items = list(items)
    s = ", ".join(items[:k])
    return s + (f", ... ({len(items)} in all)" if len(items) > k else "")


# ------------------------------------------------------------------------------------ reading

def _load_error_line(e):
    msg = str(e)
    if isinstance(e, EOFError) or "unexpected EOF" in msg:
        return "file is empty or truncated"
    if "central directory" in msg or "failed reading zip archive" in msg:
        return "truncated or corrupted zip archive (no central directory)"
    m = re.search(r"Unsupported operand \d+", msg)
    if m or "invalid load key" in msg:
        return f"not a PyTorch checkpoint (unpickling failed: {m.group(0) if m else msg.splitlines()[0]})"
    first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    return f"cannot be read by torch.load ({type(e).__name__}: {first[:160]})"


def safe_globals():
    """Data-only globals allowed in weights-only loading: numpy scalar and dtype reconstructors
    (``best_acc`` saved as a numpy float) and ``argparse.Namespace`` (saved training arguments).
    Unpickling these builds plain data; none of them calls anything the file chooses."""
    import argparse

    import numpy

    out = [numpy.dtype, argparse.Namespace]
    core = getattr(numpy, "_core", None) or numpy.core
    out.append(core.multiarray.scalar)
    dtypes = getattr(numpy, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return out


TRUST_HINT = ("if you trust the file, pass --trust-checkpoint (Python: trust=True), which runs arbitrary code "
              "from the file")


def read_checkpoint(path, log=print, *, trust=False):
    """``torch.load`` a checkpoint on CPU with the weights-only unpickler (see module docstring).

    ``trust=True`` loads a file the weights-only unpickler refuses with full unpickling, which
    runs arbitrary code from the file: only for files you trust.
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a PyTorch checkpoint file")
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line
        refused = _refused_global(e)
        if refused is None:
            raise CheckpointError(f"{path}: {_load_error_line(e)}") from None
    if not trust:
        raise CheckpointError(f"{path}: the file pickles {refused}, which the weights-only loader refuses (loading "
                              f"it could run code from the file); {TRUST_HINT}")
    log(f"warning: the file pickles {refused}; loading it with weights_only=False as --trust-checkpoint asks "
        "(this runs code from the file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: {_load_error_line(e)}") from None


def _refused_global(e):
    """What torch's weights-only unpickler refused in error ``e`` (None if it was another failure)."""
    msg = str(e)
    if re.search(r"Unsupported operand \d+", msg) or "invalid load key" in msg:
        return None  # not a pickle torch can read at all: no global was refused
    for pat in (r"Unsupported global: GLOBAL (\S+)", r"unsupported GLOBAL (\S+)"):
        m = re.search(pat, msg)
        if m:
            return m.group(1)
    if "Weights only load failed" in msg or "weights_only" in msg:
        detail = [line.strip() for line in msg.splitlines() if "WeightsUnpickler error" in line]
        return detail[0].split("error:", 1)[-1].strip()[:120] if detail else "an object the weights-only loader refuses"
    return None


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ format

def _is_state_dict(obj):
    import torch

    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def find_state_dict(obj, path, fmt=None):
    """Return ``(state_dict, format, reason, file_arch, epoch)`` of a loaded checkpoint."""
    path = str(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint dict (top-level object is {type(obj).__name__})")
    if fmt is not None and fmt not in FORMATS:
        raise RsjaxError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    file_arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
    epoch = obj.get("epoch") if isinstance(obj.get("epoch"), int) else None
    if "net" in obj and isinstance(obj["net"], dict):
        found, reason = "macer", "dict with 'net'"
        sd = obj["net"]
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        smoothadv = _SMOOTHADV_PATH.search(path)
        found = "smoothadv" if smoothadv else "cohen"
        reason = "dict with " + ", ".join(repr(k) for k in obj if isinstance(k, str) and k != "optimizer")
        if smoothadv:
            reason += f"; path mentions {smoothadv.group(0)!r}"
        sd = obj["state_dict"]
    elif _is_state_dict(obj) and any(k.startswith(("1.", "module.1.")) for k in obj):
        found, reason, sd = "cohen", "bare state dict of Sequential(normaliser, net)", obj
    elif _is_state_dict(obj):
        found, reason, sd = "torchvision", "bare state dict", obj
    else:
        keys = _short(repr(k) for k in obj)
        raise CheckpointError(f"{path}: not a recognised checkpoint (top-level keys {keys}; "
                              f"expected 'state_dict', 'net' or a bare state dict)")
    if fmt is not None and fmt != found:
        compatible = {fmt, found} <= {"cohen", "smoothadv"} or (fmt in ("cohen", "smoothadv") and found == "torchvision")
        if not compatible:
            raise CheckpointError(f"{path}: --format {fmt} does not fit this file ({reason}, which is {found})")
        reason += f"; format {fmt} as asked"
        found = fmt
    if not _is_state_dict(sd):
        bad = [k for k, v in sd.items() if not hasattr(v, "shape")]
        raise CheckpointError(f"{path}: its state dict holds non-tensor entries: {_short(map(str, bad))}")
    return sd, found, reason, file_arch, epoch


def strip_prefix(sd):
    """Strip ``module.``, ``1.``, ``module.`` (each optional, in that order) from all keys.

    Returns ``(net_state_dict, normaliser_state_dict, prefix)``; the normaliser part holds
    ``0.*`` keys of a ``Sequential(normaliser, net)`` whose normaliser stored buffers.
    """
    keys = list(sd)
    prefix = ""
    if all(k.startswith("module.") for k in keys):
        prefix, keys = "module.", [k[len("module."):] for k in keys]
    norm = {}
    if any(k.startswith("1.") for k in keys):
        rest = [k for k in keys if not k.startswith(("0.", "1."))]
        if rest:
            raise CheckpointError(f"keys outside the Sequential(normaliser, net) layout: {_short(rest)}")
        norm = {k[2:]: sd[prefix + k] for k in keys if k.startswith("0.")}
        prefix += "1."
        keys = [k[2:] for k in keys if k.startswith("1.")]
        if all(k.startswith("module.") for k in keys):
            prefix += "module."
            keys = [k[len("module."):] for k in keys]
    net = {k: sd[prefix + k] for k in keys} if prefix else dict(sd)
    return net, norm, prefix


def normaliser_from_buffers(norm):
    """(normalization, mean, std) from a normaliser's stored buffers, or None if it has none."""
    if not norm:
        return None
    mean = [k for k in norm if re.search(r"mean|^mu", k)]
    std = [k for k in norm if re.search(r"sd|std|sigma", k)]
    unused = set(norm) - set(mean) - set(std)
    if len(mean) != 1 or len(std) > 1 or unused:
        raise CheckpointError(f"cannot interpret the normaliser's state (keys {_short('0.' + k for k in norm)})")
    m = norm[mean[0]].detach().float().reshape(-1).tolist()
    if std:
        return "meanstd", m, norm[std[0]].detach().float().reshape(-1).tolist()
    return "center", m, [1.0] * len(m)


# ------------------------------------------------------------------------------------ arch

def _blocks_per_stage(keys, stage):
    idx = {int(m.group(1)) for k in keys for m in [re.match(rf"layer{stage}\.(\d+)\.", k)] if m}
    return max(idx) + 1 if idx else 0


def detect_arch(sd):
    """``(arch, num_classes, reason)`` from tensor names and shapes; CheckpointError if none fits."""
    from rsjax.models import ARCHS

    keys = set(sd)
    shape = lambda k: tuple(sd[k].shape) if k in sd else None  # noqa: E731
    stem = shape("conv1.weight")
    if stem == (20, 1, 5, 5) and "fc2.weight" in keys and "conv2.weight" in keys:
        return "lenet", shape("fc2.weight")[0], "LeNet keys conv1/conv2/fc1/fc2"
    stages = [_blocks_per_stage(keys, s) for s in range(1, 6)]
    bottleneck = "layer1.0.conv3.weight" in keys
    if stem is not None and stem[1:] == (3, 3, 3) and stages[:3] != [0, 0, 0] and stages[3] == 0 and not bottleneck:
        n = stages[0]
        if stages[:3] != [n, n, n]:
            raise CheckpointError(f"unsupported architecture: CIFAR ResNet with unequal stages {stages[:3]}")
        arch = f"cifar_resnet{6 * n + 2}"
        if arch not in ARCHS or stem[0] != 16:
            raise CheckpointError(f"unsupported architecture: CIFAR ResNet with {n} BasicBlocks per stage "
                                  f"(depth {6 * n + 2}, stem width {stem[0]})")
        return arch, shape("fc.weight")[0] if "fc.weight" in keys else None, \
            f"CIFAR ResNet, 3x3 stem, {n} BasicBlocks per stage -> depth {6 * n + 2}"
    if stem == (64, 3, 7, 7) and stages[3] > 0:
        kind = "Bottleneck" if bottleneck else "BasicBlock"
        if bottleneck and stages[:4] == [3, 4, 6, 3]:
            return "resnet50", shape("fc.weight")[0] if "fc.weight" in keys else None, \
                "torchvision ResNet, 7x7 stem, Bottleneck stages [3, 4, 6, 3]"
        raise CheckpointError(f"unsupported architecture: torchvision-style ResNet with {kind} stages "
                              f"{stages[:4]} (only ResNet-50 [3, 4, 6, 3] Bottleneck is supported)")
    raise CheckpointError(f"unsupported architecture: tensors ({_short(sorted(keys), 4)}) match none of "
                          f"{', '.join(ARCHS)}")


# ------------------------------------------------------------------------------------ mapping

_MODULE_NAME = [(re.compile(r"^(layer\d+)_(\d+)$"), r"\1.\2"),
                (re.compile(r"^downsample_conv$"), "downsample.0"),
                (re.compile(r"^downsample_bn$"), "downsample.1")]
_LEAF = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
         ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def flax_path_to_torch_key(path):
    """('params', 'layer2_0', 'downsample_conv', 'kernel') -> 'layer2.0.downsample.0.weight'."""
    collection, *modules, leaf = path
    names = []
    for m in modules:
        for pat, rep in _MODULE_NAME:
            if pat.match(m):
                m = pat.sub(rep, m)
                break
        names.append(m)
    return ".".join(names + [_LEAF[(collection, leaf)]])


def _to_flax_layout(a, leaf):
    if leaf == "kernel" and a.ndim == 4:
        return np.transpose(a, (2, 3, 1, 0))  # OIHW -> HWIO
    if leaf == "kernel" and a.ndim == 2:
        return a.T  # [out, in] -> [in, out]
    return a


def _torch_layout_shape(shape, leaf):
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def expected_variables(arch, num_classes):
    """The abstract Flax variable tree (ShapeDtypeStructs) of ``arch``."""
    import jax
    import jax.numpy as jnp

    from rsjax.models import build_model, input_shape

    model = build_model(arch, num_classes)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + input_shape(arch))))


def torch_to_flax(sd, arch, num_classes):
    """Map a prefix-free PyTorch state dict onto ``arch``'s Flax variables, strictly.

    Returns a nested dict ``{'params': ..., ['batch_stats': ...]}`` of float32 numpy arrays.
    Raises CheckpointError naming the missing, unexpected and misshapen keys.
    """
    from flax import traverse_util

    expected = traverse_util.flatten_dict(dict(expected_variables(arch, num_classes)))
    source = {k: v for k, v in sd.items() if not k.endswith(_IGNORED_SUFFIX)}
    out, missing, wrong = {}, [], []
    used = set()
    for path, spec in expected.items():
        key = flax_path_to_torch_key(path)
        if key not in source:
            missing.append(key)
            continue
        used.add(key)
        a = source[key].detach().cpu().float().numpy()
        if not np.isfinite(a).all():
            bad = int(np.size(a) - np.isfinite(a).sum())
            raise CheckpointError(f"tensor {key} has {bad} non-finite value(s) (NaN or inf); the checkpoint is "
                                  "corrupt or diverged and cannot give a certificate")
        a = _to_flax_layout(a, path[-1])
        if a.shape != tuple(spec.shape):
            wrong.append(f"{key} {tuple(source[key].shape)} (expected {_torch_layout_shape(spec.shape, path[-1])})")
            continue
        out[path] = np.ascontiguousarray(a, dtype=np.float32)
    extra = sorted(set(source) - used)
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_short(missing)}")
        if extra:
            parts.append(f"unexpected {len(extra)} key(s): {_short(extra)}")
        if wrong:
            parts.append(f"wrong shape: {_short(wrong, 4)}")
        raise CheckpointError(f"state dict does not match {arch} ({num_classes} classes): " + "; ".join(parts))
    return traverse_util.unflatten_dict(out)


# ------------------------------------------------------------------------------------ metadata

def sigma_from_path(path):
    """Training sigma named in a path: ``noise_0.25``, ``noise0.25``, ``sigma_0.5``, ``0.25.pth``."""
    p = str(path)
    hits = re.findall(r"(?:noise|sigma)[_-]?(\d+(?:\.\d+)?)", p, flags=re.IGNORECASE)
    if hits:
        return float(hits[-1])
    m = re.match(r"^(\d+\.\d+)\.pth(?:\.tar)?$", os.path.basename(p))
    return float(m.group(1)) if m else None


def dataset_from_path(path):
    p = str(path).lower()
    for name, pat in (("imagenet", r"imagenet"), ("cifar10", r"cifar[-_]?10(?!\d)"), ("mnist", r"mnist")):
        if re.search(pat, p):
            return name
    return None


# ------------------------------------------------------------------------------------ main

def convert_checkpoint(src, out_dir, *, arch=None, dataset=None, fmt=None, normalization="auto",
                       sigma=None, overwrite=False, trust=False, log=print):
    """Convert the PyTorch checkpoint ``src`` into an rsjax model directory ``out_dir``.

    Returns the metadata dict written to ``out_dir/rsjax_model.json``. ``log`` receives one line
    per detection step. ``trust``: see :func:`read_checkpoint` (runs code from the file).
    """
    src = Path(src).expanduser().resolve()
    if normalization not in NORMALIZATIONS:
        raise RsjaxError(f"unknown normalization {normalization!r}; known: {', '.join(NORMALIZATIONS)}")
    if dataset is not None and dataset not in DATASET_INFO:
        raise RsjaxError(f"unknown dataset {dataset!r}; known: {', '.join(DATASET_INFO)}")
    if sigma is not None and not sigma >= 0:
        raise RsjaxError(f"sigma must be >= 0, got {sigma}")
    out_dir = Path(out_dir).expanduser().resolve()
    _check_out_dir(out_dir, overwrite)

    obj = read_checkpoint(src, log=log, trust=trust)
    sd, found_fmt, reason, file_arch, epoch = find_state_dict(obj, src, fmt)
    net_sd, norm_sd, prefix = strip_prefix(sd)

    from rsjax.classifier import save_classifier  # jax/flax only from here on
    from rsjax.models import ARCHS, input_shape

    if arch is not None and arch not in ARCHS:
        raise RsjaxError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    log(f"format: {found_fmt} ({reason}); key prefix {prefix or '(none)'!r}; {len(net_sd)} tensors")

    det_arch, num_classes, arch_reason = detect_arch(net_sd)
    if arch is not None and arch != det_arch:
        raise CheckpointError(f"--arch {arch} does not fit the tensors, which are those of {det_arch} ({arch_reason})")
    if file_arch is not None and file_arch in ARCHS and file_arch != det_arch:
        raise CheckpointError(f"the file says arch {file_arch!r} but its tensors are those of {det_arch} ({arch_reason})")
    arch = det_arch
    note = f"; the file says {file_arch!r}" if file_arch else ""
    if num_classes is None:
        raise CheckpointError("state dict has no classifier weights (fc.weight)")
    log(f"arch: {arch} ({arch_reason}{note}); {num_classes} classes")

    how = "as asked"
    if dataset is None:
        dataset, how = dataset_from_path(src), "from the path"
        if dataset is None or DATASET_INFO[dataset].num_classes != num_classes:
            dataset, how = ARCHS[arch].dataset, f"default for {arch}"
    d = DATASET_INFO[dataset]
    if d.num_classes != num_classes:
        raise CheckpointError(f"the classifier has {num_classes} outputs but {dataset} has "
                              f"{d.num_classes} classes; pass --dataset")

    from_buffers = normaliser_from_buffers(norm_sd)
    if normalization != "auto":
        norm, norm_how = normalization, "as asked"
        mean, std = list(d.mean), list(d.std)
    elif from_buffers is not None:
        norm, mean, std = from_buffers
        norm_how = "from the normaliser's buffers in the file"
    else:
        if found_fmt == "macer":
            norm, norm_how = "none", "MACER feeds raw [0, 1] pixels"
        elif found_fmt == "smoothadv":
            norm, norm_how = "meanstd", "SmoothAdv default NormalizeLayer"
            log("warning: SmoothAdv checkpoints use NormalizeLayer or InputCenterLayer and the file does "
                "not say which; assumed NormalizeLayer (mean/std). Pass --normalization center for "
                "InputCenterLayer models")
        elif found_fmt == "torchvision":
            norm, norm_how = "meanstd", f"torchvision models expect {dataset} mean/std"
        else:
            norm = COHEN_NORMALIZATION[dataset]
            norm_how = (f"Cohen-style NormalizeLayer for {dataset}" if norm == "meanstd"
                        else f"Cohen-style {dataset} models use an identity normaliser")
        mean, std = list(d.mean), list(d.std)
    if norm == "center":
        std = [1.0] * len(mean)
    elif norm == "none":
        mean, std = [0.0] * len(d.mean), [1.0] * len(d.mean)
    if from_buffers is not None and normalization != "auto":
        log(f"warning: the file stores a {from_buffers[0]} normaliser but --normalization {normalization} was asked")

    if sigma is None:
        sigma, sigma_how = sigma_from_path(src), "from the path"
    else:
        sigma_how = "as asked"
    log(f"dataset: {dataset} ({how}); normalization: {norm} mean={mean} std={std} ({norm_how}); "
        f"training sigma: {sigma} ({sigma_how if sigma is not None else 'not in the path'})")

    variables = torch_to_flax(net_sd, arch, num_classes)
    meta = {
        "arch": arch,
        "dataset": dataset,
        "num_classes": int(num_classes),
        "input_shape": list(input_shape(arch)),
        "normalization": norm,
        "mean": [float(x) for x in mean],
        "std": [float(x) for x in std],
        "sigma": sigma,
        "source": str(src),
        "source_sha256": sha256_file(src),
        "source_format": found_fmt,
        "source_arch": file_arch,
        "source_epoch": epoch,
        "converter_version": CONVERTER_VERSION,
    }
    save_classifier(out_dir, variables, meta, overwrite=overwrite)
    n = sum(int(np.prod(a.shape)) for a in _leaves(variables.get("params", {})))
    log(f"wrote {out_dir} ({n:,} parameters)")
    return meta


def _leaves(tree):
    for v in tree.values():
        if isinstance(v, dict):
            yield from _leaves(v)
        else:
            yield v


def _check_out_dir(out_dir, overwrite):
    if out_dir.exists() and not out_dir.is_dir():
        raise RsjaxError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise RsjaxError(f"{out_dir}: exists and is not empty (pass --overwrite to replace a converted model)")
        if not (out_dir / "rsjax_model.json").is_file():
            raise RsjaxError(f"{out_dir}: not an rsjax model directory; refusing to overwrite it")
