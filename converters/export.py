"""Export an rsjax model as a PyTorch checkpoint in a reference layout (the inverse of converters.pytorch).

- ``cohen`` (locuslab/smoothing ``code/train.py``): ``{'epoch', 'arch', 'state_dict'}`` where the
  state dict is that of ``Sequential(NormalizeLayer, net)``: keys prefixed ``1.`` (the normaliser
  keeps no state), ``num_batches_tracked`` for every BatchNorm. Cohen's loader puts the dataset's
  normaliser in front (mean/std on CIFAR-10 and ImageNet; the shared MNIST LeNet has none), so
  the model's normalisation must be that one.
- ``macer`` (RuntianZ/macer ``main.py``): ``{'net': state_dict, 'epoch'}``, unprefixed keys, no
  normaliser: the model must have been trained without normalisation.

Layouts: Flax conv kernels HWIO -> OIHW, Dense ``[in, out]`` -> ``[out, in]``, BatchNorm
``scale/bias/mean/var`` -> ``weight/bias/running_mean/running_var`` (names by
:func:`converters.pytorch.flax_path_to_torch_key`). Only tensors and ints are saved, so the file
loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from converters.pytorch import COHEN_NORMALIZATION, flax_path_to_torch_key
from rsjax.data.datasets import DATASET_INFO
from rsjax.errors import RsjaxError

FORMATS = ("cohen", "macer")


def _to_torch_layout(a: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and a.ndim == 4:
        return np.transpose(a, (3, 2, 0, 1))  # HWIO -> OIHW
    if leaf == "kernel" and a.ndim == 2:
        return a.T
    return a


def state_dict_from_variables(variables, *, num_batches_tracked: int = 0):
    """PyTorch state dict (unprefixed keys, torch tensors) of rsjax Flax variables."""
    import torch
    from flax import traverse_util

    flat = traverse_util.flatten_dict({k: dict(v) for k, v in dict(variables).items()})
    sd = {}
    for path, a in flat.items():
        key = flax_path_to_torch_key(path)
        sd[key] = torch.from_numpy(np.array(_to_torch_layout(np.asarray(a, np.float32), path[-1]), order="C"))
        if path[0] == "batch_stats" and path[-1] == "var":
            sd[key[:-len("running_var")] + "num_batches_tracked"] = torch.tensor(int(num_batches_tracked))
    return sd


def check_normalization(meta: dict, fmt: str):
    """RsjaxError unless the model's normalisation is the one the reference layout implies."""
    norm = meta.get("normalization", "meanstd")
    if fmt == "macer" and norm != "none":
        raise RsjaxError(f"--format macer has no normaliser, but this model normalises its input ({norm}); "
                         "export it with --format cohen")
    if fmt == "cohen":
        want = COHEN_NORMALIZATION.get(meta["dataset"], "meanstd")
        if norm != want:
            raise RsjaxError(f"--format cohen implies {want} normalisation on {meta['dataset']}, but this model has "
                             f"{norm}" + ("; export it with --format macer" if norm == "none" else ""))
        if want == "meanstd":
            ref = DATASET_INFO[meta["dataset"]]
            if not (np.allclose(meta["mean"], ref.mean) and np.allclose(meta["std"], ref.std)):
                raise RsjaxError(f"--format cohen implies {meta['dataset']}'s mean/std, the model has "
                                 f"{meta['mean']} / {meta['std']}")


def export_checkpoint(model_dir, out_path, fmt: str = "cohen", *, overwrite: bool = False):
    """Write the PyTorch checkpoint of the rsjax model ``model_dir`` to ``out_path``; returns the dict saved."""
    import torch

    from rsjax.classifier import load_classifier, read_meta

    if fmt not in FORMATS:
        raise RsjaxError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    out_path = Path(out_path).expanduser()
    if out_path.is_dir():
        raise RsjaxError(f"{out_path}: is a directory, expected a file name such as checkpoint.pth.tar")
    if out_path.exists() and not overwrite:
        raise RsjaxError(f"{out_path}: exists (pass --overwrite to replace it)")
    if not out_path.parent.is_dir():
        raise RsjaxError(f"{out_path.parent}: no such directory")
    meta = read_meta(model_dir)
    check_normalization(meta, fmt)
    f, _ = load_classifier(model_dir, fold_bn=False, pack_narrow=False)
    training = meta.get("training") or {}
    epoch = int(training.get("epochs", meta.get("epoch", 0)) or 0)
    sd = state_dict_from_variables(f.variables, num_batches_tracked=int(training.get("steps", 0) or 0))
    if fmt == "cohen":
        obj = {"epoch": epoch, "arch": meta["arch"], "state_dict": {"1." + k: v for k, v in sd.items()}}
    else:
        obj = {"net": sd, "epoch": epoch}
    tmp = out_path.with_name(out_path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(out_path)
    return obj
