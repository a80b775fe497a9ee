"""Shared pieces of the benchmarks: the same network in PyTorch and in rsjax, machine facts, output.

The PyTorch network is the reference definition (``converters/torch_reference.py``);
its weights (random, with randomised BatchNorm statistics calibrated on a batch so that a deep
random net keeps sane activations, or a real checkpoint) are converted with the converter
(``converters.pytorch.torch_to_flax``), so both frameworks evaluate the same function.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
MODELS = ("cifar_resnet110", "cifar_resnet20", "resnet50", "lenet")


def cohen_sample_noise(model, x, num, batch_size, sigma, num_classes):
    """Cohen et al.'s ``Smooth._sample_noise`` (core.py), verbatim apart from the device: counts of
    ``argmax model(x + sigma * eps)`` over ``num`` draws, ``batch_size`` at a time (``x.repeat``,
    ``randn_like``, forward under ``no_grad``, counts on the host with a Python loop)."""
    import torch

    def _count_arr(arr, length):
        counts = np.zeros(length, dtype=int)
        for idx in arr:
            counts[idx] += 1
        return counts

    with torch.no_grad():
        counts = np.zeros(num_classes, dtype=int)
        for _ in range(math.ceil(num / batch_size)):
            this_batch_size = min(batch_size, num)
            num -= this_batch_size
            batch = x.repeat((this_batch_size, 1, 1, 1))
            noise = torch.randn_like(batch) * sigma
            predictions = model(batch + noise).argmax(1)
            counts += _count_arr(predictions.cpu().numpy(), num_classes)
        return counts


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_model() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def torch_device(choice: str = "auto") -> str:
    """The PyTorch device of the benchmarks: ``auto`` = ``cuda`` when PyTorch sees a GPU, else ``cpu``."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--torch-device cuda: this PyTorch build sees no CUDA device "
                         f"(torch {torch.__version__}); install a CUDA build or use --torch-device cpu")
    return choice


def same_device_note(rec: dict, torch_dev: str, log) -> bool:
    """Whether JAX and PyTorch ran on the same kind of device; warns (and the records say so) if not."""
    same = (rec["platform"] == "gpu") == (torch_dev == "cuda")
    if not same:
        log(f"WARNING: JAX ran on {rec['platform']} but PyTorch on {torch_dev}: the ratios do not compare "
            f"the same machine's device")
    return same


def torch_model(arch: str, checkpoint=None, seed: int = 0, device: str = "cpu"):
    """(torch Sequential(normaliser, net) in eval mode on ``device``, net state dict, meta) for ``arch``."""
    import torch

    from converters import torch_reference as tr
    from converters.pytorch import COHEN_NORMALIZATION, find_state_dict, read_checkpoint, strip_prefix
    from rsjax.data import DATASET_INFO
    from rsjax.models import ARCHS

    dataset = ARCHS[arch].dataset
    d = DATASET_INFO[dataset]
    nc = d.num_classes
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = tr.build_net(arch, nc)
    h, w, c = ARCHS[arch].input_shape
    if checkpoint is not None:
        sd, _, _, _, _ = find_state_dict(read_checkpoint(checkpoint, log=lambda *_: None), checkpoint)
        net_sd, _, _ = strip_prefix(sd)
        net.load_state_dict(net_sd)
    elif any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()):
        calib = torch.rand(32 if arch != "resnet50" else 8, c, h, w, generator=g)
        tr.randomize_batchnorm_(net, generator=g, calibrate=calib)
    norm = COHEN_NORMALIZATION[dataset]
    mean, std = (list(d.mean), list(d.std)) if norm == "meanstd" else ([0.0] * c, [1.0] * c)
    model = tr.cohen_model(net, tr.NormalizeLayer(mean, std)).eval().to(device)
    meta = {"arch": arch, "dataset": dataset, "num_classes": nc, "input_shape": [h, w, c], "mean": mean, "std": std,
            "weights": str(checkpoint) if checkpoint else f"random (seed {seed})"}
    return model, {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}, meta


def rsjax_classifier(state_dict, meta, *, dtype="float32", fold=True, pack=False, cpu_kernels="xla"):
    """The torch net's weights as an rsjax classifier (:func:`rsjax.classifier.classifier_from_variables`,
    as ``load_classifier`` builds it): ``logits = f(x)`` for float32 NHWC x in [0, 1].

    ``fold``: BatchNorm folded into the convolutions; ``pack``: narrow convolutions width-packed
    (rsjax.models.pack, folded models only) - both the same function up to float rounding;
    ``cpu_kernels``: ``onednn`` runs the convolutions in oneDNN (rsjax.kernels.onednn)."""
    from converters.pytorch import torch_to_flax
    from rsjax.classifier import classifier_from_variables

    variables = torch_to_flax(state_dict, meta["arch"], meta["num_classes"])
    return classifier_from_variables(meta["arch"], variables, meta, dtype=dtype, fold=fold, pack=pack,
                                     cpu_kernels=cpu_kernels)


def versions() -> dict:
    import jax

    out = {"jax": jax.__version__, "python": sys.version.split()[0], "numpy": np.__version__}
    try:
        import flax

        out["flax"] = flax.__version__
    except ImportError:
        pass
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:
        out["torch"] = None
    out["rsjax_git"] = rsjax_git()
    return out


def rsjax_git() -> str | None:
    """The commit of this checkout, with ``+changes`` when tracked files differ from it (None outside git)."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("+changes" if dirty else "")


def machine() -> dict:
    import jax

    dev = jax.devices()[0]
    return {
        "device_kind": dev.device_kind,
        "platform": dev.platform,
        "num_devices": jax.device_count(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu_model": gpu_model(),
        "hostname": platform.node(),
    }


def device_label(rec: dict) -> str:
    """The device column of a result row: the GPU model, or the CPU model and its core count."""
    return rec["gpu_model"] if rec["platform"] == "gpu" else f"{rec['cpu_model']} ({rec['cpu_count']} cores)"


def write_result(kind: str, record: dict, md_row: str, md_header: str) -> Path:
    """benchmarks/results/<kind>_<model>_b<batch>_<dtype>_<platform>_<utc time>.json, plus the
    markdown row appended to benchmarks/results/<kind>.md (header written once)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    kern = f"_{record['cpu_kernels']}" if record.get("cpu_kernels") not in (None, "xla") else ""
    name = f"{kind}_{record['model']}_b{record['batch']}_{record['dtype']}{kern}_{record['platform']}_{stamp}"
    path, i = RESULTS / f"{name}.json", 1
    while path.exists():  # several records of one run in the same second
        path, i = RESULTS / f"{name}_{i}.json", i + 1
    path.write_text(json.dumps(record, indent=2) + "\n")
    md = RESULTS / f"{kind}.md"
    if not md.exists():
        md.write_text(md_header.rstrip("\n") + "\n")
    with open(md, "a") as fh:
        fh.write(md_row.rstrip("\n") + "\n")
    return path
