"""Smooth-Reduce cost: seconds per image against plain Cohen CERTIFY on the same model, and the
reference's PatchSmooth loop in PyTorch, side by side, interleaved, same machine.

    python benchmarks/smooth_reduce.py [--checkpoint PATH] [--N 400] [--N0 100] [--reps 2] [--batch 1000]

Contenders, on one real CIFAR-10 test image (index --image), resized 32 -> 36, 25 patches 32 x 32:

- ``cohen``: rsjax.certify, n0 + N forwards;
- ``sr-independent`` / ``sr-shared``: rsjax's Smooth-Reduce (mean), (n0 + N) * 25 patch forwards;
- ``torch-patchsmooth``: NYU-DICE-Lab/SmoothReduce ``PatchSmooth.certify`` (uncorrelated noise),
  the loop copied from ``smoothadv/patch_model.py`` (only the hard-coded ``device='cuda'`` of
  the noise follows the input instead, a debug print is dropped, and the Clopper-Pearson bound
  is scipy's Beta quantile, the value statsmodels' ``proportion_confint(method="beta")`` returns).

The same weights everywhere (Cohen-format checkpoint -> converters' reference PyTorch network and
the converted Flax network). Each repetition runs all contenders in turn; JAX is compiled before
the first repetition (a call with the same layout). Reported: seconds per image and per forward
(patch forward for Smooth-Reduce), and the ratio of rsjax's cost per patch forward to plain
CERTIFY's per forward. The JSON goes to benchmarks/results/smooth_reduce_*.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from math import ceil
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._common import machine, rsjax_classifier, torch_model, versions, write_result  # noqa: E402


def reference_patch_smooth(torch):
    """PatchSmooth from NYU-DICE-Lab/SmoothReduce smoothadv/patch_model.py (dense-grid patches,
    uncorrelated noise): get_patches, certify, _sample_noise, _count_arr, _lower_confidence_bound."""
    import torch.nn as nn
    import torch.nn.functional as F
    from scipy.stats import norm

    from rsjax.core.stats import clopper_pearson_lower

    class PatchSmooth(nn.Module):
        def __init__(self, base_classifier, num_patches, patch_size, patch_stride=1, reduction='mean',
                     num_classes=10, sigma=0.12, random_patches=False):
            super().__init__()
            self.base_classifier = base_classifier
            self.num_patches = num_patches
            self.patch_size = patch_size
            self.patch_stride = patch_stride
            self.reduction = reduction
            self.num_classes = num_classes
            self.sigma = sigma
            self.random_patches = random_patches

        def get_patches(self, x):
            b, c, h, w = x.shape
            patches = x.unfold(2, self.patch_size, self.patch_stride).unfold(
                3, self.patch_size, self.patch_stride)
            _, _, px, py, _, _ = patches.shape
            gen_num_patches = px * py
            patches = patches.reshape(
                b, c, gen_num_patches, self.patch_size, self.patch_size)
            if gen_num_patches > self.num_patches:
                patches = patches[:, :, :self.num_patches, ...]
            patches = patches.permute(0, 2, 1, 3, 4).contiguous()
            return patches

        def certify(self, x, n0, n, alpha, batch_size):
            patches = self.get_patches(x)
            counts_selection = self._sample_noise(patches[0], n0, batch_size)
            cAhat = counts_selection.argmax().item()
            counts_estimation = self._sample_noise(patches[0], n, batch_size)
            nA = counts_estimation[cAhat].item()
            pABar = self._lower_confidence_bound(nA, n, alpha)
            if pABar < 0.5:
                return -1, 0.0
            else:
                radius = self.sigma * norm.ppf(pABar)
                return cAhat, radius

        def _sample_noise(self, x, num, batch_size):
            with torch.no_grad():
                counts = np.zeros(self.num_classes, dtype=int)
                for _ in range(ceil(num / batch_size)):
                    this_batch_size = min(batch_size, num)
                    num -= this_batch_size
                    batch = x.unsqueeze(1).repeat((1, this_batch_size, 1, 1, 1))
                    noise = torch.randn_like(batch, device=batch.device) * self.sigma
                    batch = batch + noise
                    pn, c, ch, w, h = batch.shape
                    batch = batch.view(pn * c, ch, w, h)
                    predictions = F.softmax(self.base_classifier(batch), dim=-1)
                    predictions = predictions.view(pn, c, -1)
                    if self.reduction == 'max':
                        pred_maxs = predictions.max(0)[0]
                    elif self.reduction == 'mean':
                        pred_maxs = predictions.mean(0)
                    predictions = pred_maxs.argmax(1)
                    counts += self._count_arr(predictions.cpu().numpy(), self.num_classes)
                return counts

        def _count_arr(self, arr, length):
            counts = np.zeros(length, dtype=int)
            for idx in arr:
                counts[idx] += 1
            return counts

        def _lower_confidence_bound(self, NA, N, alpha):
            # statsmodels' proportion_confint(NA, N, alpha=2 * alpha, method="beta")[0] (not installed here)
            return clopper_pearson_lower(NA, N, alpha)

    return PatchSmooth


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path,
                   default=REPO.parent / "shared" / "data" / "models" / "cifar10_resnet20_noise0.25" / "checkpoint.pth.tar")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--N0", type=int, default=100)
    p.add_argument("--N", type=int, default=400)
    p.add_argument("--batch", type=int, default=1000, help="forwards per device step (patches for Smooth-Reduce); "
                                                           "the reference's --batch is draws per step: batch / 25")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--image", type=int, default=0)
    a = p.parse_args()

    import jax
    import torch

    import rsjax
    from rsjax.certifiers.smooth_reduce import SmoothReduceConfig, build
    from rsjax.certifiers.patches import resize, resize_matrices
    from rsjax.data import load_dataset

    load_start = os.getloadavg()
    model, sd, meta = torch_model("cifar_resnet20", a.checkpoint)
    f, _ = rsjax_classifier(sd, meta)
    x, y = load_dataset("cifar10").batch([a.image])
    P = 25
    runners = {nz: build(SmoothReduceConfig(noise=nz), (f, meta), seed=0, batch_size=a.batch)
               for nz in ("independent", "shared")}
    rh, rw = resize_matrices((32, 32), (36, 36), "bilinear")
    x36 = torch.from_numpy(np.asarray(resize(x, rh, rw))).permute(0, 3, 1, 2).contiguous()
    ref = reference_patch_smooth(torch)(model, num_patches=P, patch_size=32, patch_stride=1, reduction="mean",
                                        num_classes=10, sigma=a.sigma)
    ref.base_classifier.eval()
    idx = np.array([a.image])

    contenders = {
        "cohen": lambda: rsjax.certify(f, x, sigma=a.sigma, n0=a.N0, n=a.N, alpha=0.001, key=0, idx=idx,
                                       batch_size=a.batch),
        "sr-independent": lambda: runners["independent"].certify(x, idx, a.sigma, n0=a.N0, n=a.N, alpha=0.001),
        "sr-shared": lambda: runners["shared"].certify(x, idx, a.sigma, n0=a.N0, n=a.N, alpha=0.001),
        "torch-patchsmooth": lambda: ref.certify(x36, a.N0, a.N, 0.001, max(1, a.batch // P)),
    }
    forwards = {"cohen": a.N0 + a.N, "sr-independent": (a.N0 + a.N) * P, "sr-shared": (a.N0 + a.N) * P,
                "torch-patchsmooth": (a.N0 + a.N) * P}
    for name in ("cohen", "sr-independent", "sr-shared"):  # compile
        contenders[name]()
    times = {k: [] for k in contenders}
    results = {}
    for rep in range(a.reps):
        for name, fn in contenders.items():
            t = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t)
            results[name] = out if name == "torch-patchsmooth" else None
            print(f"rep {rep} {name}: {times[name][-1]:.2f} s", flush=True)
    best = {k: min(v) for k, v in times.items()}
    per_fwd = {k: best[k] / forwards[k] for k in best}
    rec = dict(machine(), **{
        "model": "cifar_resnet20", "batch": a.batch, "dtype": "float32", "weights": str(a.checkpoint),
        "settings": dict(N0=a.N0, N=a.N, sigma=a.sigma, reps=a.reps, image=a.image, patches=P, resize=36,
                         aggregate="mean"),
        "versions": versions(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "shared_machine": True, "times_s": times, "best_s": best, "forwards": forwards,
        "s_per_forward": per_fwd,
        "patch_forward_vs_plain_forward": {k: per_fwd[k] / per_fwd["cohen"] for k in per_fwd},
        "torch_threads": torch.get_num_threads(),
    })
    row = (f"| {rec['cpu_model']} ({rec['cpu_count']} cores, load {load_start[0]:.1f}->{rec['loadavg_end'][0]:.1f}) "
           f"| N={a.N} | " + " | ".join(f"{best[k]:.1f} s ({per_fwd[k] * 1e3:.2f} ms/fwd)" for k in contenders)
           + f" | {rec['patch_forward_vs_plain_forward']['sr-independent']:.2f} / "
             f"{rec['patch_forward_vs_plain_forward']['sr-shared']:.2f} |")
    header = ("| machine | N | cohen | sr-independent | sr-shared | torch-patchsmooth | patch fwd / plain fwd "
              "(ind / shared) |\n|---|---|---|---|---|---|---|")
    path = write_result("smooth_reduce", rec, row, header)
    print(row)
    print("wrote", path)


if __name__ == "__main__":
    main()
