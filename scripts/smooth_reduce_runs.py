"""Smooth-Reduce on the real CIFAR-10 ResNet-20s beside plain Cohen CERTIFY, same images and seeds.

For each test image (indices start, start+skip, ...), in turn: Cohen CERTIFY (rsjax.certify) at
each sigma, then Smooth-Reduce (36 -> 32, 25 patches, stride 1) at each sigma and noise variant,
mean and max aggregated from the same draws (the two reductions of the same patch logits, so
each equals a separate run). Rows are appended as they finish, so a stopped run resumes where it
stopped (images already in every file are skipped). One TSV per setting in --out-dir:

    smooth_reduce_cifar10_rn20_s{sigma}_{cohen | <noise>_<aggregate>}_N{N}.tsv

with Cohen's six columns first (``idx label predict radius correct time``; ``time`` is the
image's wall time, shared by mean and max) and then ``radius_raw pA_lower nonfinite guarantee
op_norm c_max`` (Cohen files: ``pA_lower``); ``radius`` is the sound image-space radius.
``--summary`` writes the table (docs/results/smooth_reduce_summary_N<N>.tsv) and the plot
(docs/img/smooth_reduce_cifar10_N<N>.png).

    python scripts/smooth_reduce_runs.py --images 1000          # runs until stopped
    python scripts/smooth_reduce_runs.py --summary
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

COHEN = ("idx", "label", "predict", "radius", "correct", "time")
EXTRA = ("radius_raw", "pA_lower", "nonfinite", "guarantee", "op_norm", "c_max")
AGGS = ("mean", "max")


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.50])
    p.add_argument("--noises", nargs="+", default=["independent", "shared"])
    p.add_argument("--images", type=int, default=1017, help="at most this many images")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--skip", type=int, default=1)
    p.add_argument("--N0", type=int, default=100)
    p.add_argument("--N", type=int, default=10_000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--cpu-kernels", default="xla", choices=("auto", "onednn", "xla"),
                   help="the classifier's CPU convolution kernels (rsjax certify --cpu-kernels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--models", type=Path, default=REPO / "out" / "models", help="converted models (cache)")
    p.add_argument("--summary", action="store_true", help="only summarise the files in --out-dir")
    return p.parse_args()


def tsv_name(out_dir, sigma, kind, n):
    return out_dir / f"smooth_reduce_cifar10_rn20_s{sigma:.2f}_{kind}_N{n}.tsv"


def done_indices(path):
    import pandas as pd

    return set() if not path.exists() else set(pd.read_csv(path, delimiter="\t")["idx"].tolist())


def append(path, columns, row):
    new = not path.exists()
    with open(path, "a") as fh:
        if new:
            fh.write("\t".join(columns) + "\n")
        fh.write("\t".join(str(row[c]) for c in columns) + "\n")


def model(sigma, cache, cpu_kernels="xla"):
    from converters.pytorch import convert_checkpoint
    from rsjax.classifier import load_classifier
    from rsjax.paths import SHARED_DATA

    out = cache / f"cifar10_resnet20_noise{sigma:.2f}"
    if not (out / "rsjax_model.json").is_file():
        convert_checkpoint(SHARED_DATA / "models" / f"cifar10_resnet20_noise{sigma:.2f}" / "checkpoint.pth.tar", out,
                           log=lambda *_: None)
    return load_classifier(out, cpu_kernels=cpu_kernels)


def run(args):
    import jax
    from tqdm import tqdm

    import rsjax
    from rsjax.certifiers.smooth_reduce import SmoothReduceConfig, build
    from rsjax.config import to_dict
    from rsjax.data import load_dataset

    args.out_dir.mkdir(parents=True, exist_ok=True)
    ds = load_dataset("cifar10")
    indices = [i for i in range(args.start, len(ds), args.skip)][: args.images]
    models = {s: model(s, args.models, args.cpu_kernels) for s in args.sigmas}
    runners = {}
    for s in args.sigmas:
        for noise in args.noises:
            cfg = SmoothReduceConfig(resize=36, patch_size=32, patch_stride=1, num_patches=25, noise=noise)
            runners[s, noise] = build(cfg, models[s], seed=args.seed, batch_size=args.batch)
    settings = dict(N0=args.N0, N=args.N, alpha=args.alpha, batch=args.batch, seed=args.seed,
                    sigmas=args.sigmas, noises=args.noises, aggregates=list(AGGS), skip=args.skip,
                    start=args.start, cpu_kernels=models[args.sigmas[0]][1].get("cpu_kernels", "xla"),
                    smooth_reduce=to_dict(runners[args.sigmas[0], args.noises[0]].cfg),
                    jax=jax.__version__, device=str(jax.devices()[0]), cpu_count=os.cpu_count(),
                    load_at_start=os.getloadavg())
    (args.out_dir / f"smooth_reduce_settings_N{args.N}.json").write_text(json.dumps(settings, indent=2) + "\n")

    files = {(s, "cohen"): tsv_name(args.out_dir, s, "cohen", args.N) for s in args.sigmas}
    files.update({(s, f"{nz}_{a}"): tsv_name(args.out_dir, s, f"{nz}_{a}", args.N)
                  for s in args.sigmas for nz in args.noises for a in AGGS})
    done = {k: done_indices(p) for k, p in files.items()}
    todo = [i for i in indices if not all(i in d for d in done.values())]
    per_image = len(args.sigmas) * (args.N0 + args.N) * (1 + len(args.noises))
    bar = tqdm(total=len(todo) * per_image, unit="draw", desc="smooth-reduce runs", smoothing=0.05)
    for i in todo:
        x, y = ds.batch([i])
        for s in args.sigmas:
            if i not in done[s, "cohen"]:
                t = time.perf_counter()
                f = models[s][0]
                pred, rad, pl = rsjax.certify(f, x, sigma=s, n0=args.N0, n=args.N, alpha=args.alpha, key=args.seed,
                                              idx=np.array([i]), batch_size=args.batch)
                dt = datetime.timedelta(seconds=time.perf_counter() - t)
                append(files[s, "cohen"], COHEN + ("pA_lower",),
                       dict(idx=i, label=y[0], predict=pred[0], radius=rad[0], correct=int(pred[0] == y[0]), time=dt,
                            pA_lower=pl[0]))
            bar.update(args.N0 + args.N)
            for nz in args.noises:
                if all(i in done[s, f"{nz}_{a}"] for a in AGGS):
                    bar.update(args.N0 + args.N)
                    continue
                t = time.perf_counter()
                res = runners[s, nz].certify_aggregates(x, np.array([i]), s, n0=args.N0, n=args.N, alpha=args.alpha,
                                                        aggregates=AGGS, progress=bar.update)
                dt = datetime.timedelta(seconds=time.perf_counter() - t)
                for a in AGGS:
                    r = {k: v[0] for k, v in res[a].items()}
                    if i not in done[s, f"{nz}_{a}"]:
                        append(files[s, f"{nz}_{a}"], COHEN + EXTRA,
                               dict(r, idx=i, label=y[0], correct=int(r["predict"] == y[0]), time=dt))
    bar.close()


def seconds(t):
    """Cohen's time column: str(timedelta) such as 0:00:13.736080, or plain seconds."""
    t = str(t)
    if ":" not in t:
        return float(t)
    h, m, s = t.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def summary(args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    paths = sorted(args.out_dir.glob(f"smooth_reduce_cifar10_rn20_s*_N{args.N}.tsv"))
    frames = {p.stem.split("_rn20_")[1].rsplit("_N", 1)[0]: pd.read_csv(p, delimiter="\t") for p in paths}
    common = set.intersection(*(set(f["idx"]) for f in frames.values()))
    rows = []
    radii = (0.0, 0.25, 0.5, 0.75, 1.0)
    fig, axes = plt.subplots(1, len(args.sigmas), figsize=(6 * len(args.sigmas), 4.2), squeeze=False)
    for name, f in frames.items():
        f = f[f["idx"].isin(common)]
        sigma, kind = float(name.split("_")[0][1:]), name.split("_", 1)[1]
        ok = f["correct"] == 1
        row = dict(sigma=sigma, certifier=kind, images=len(f),
                   abstain=float((f["predict"] == -1).mean()),
                   acr_sound=float((f["radius"] * ok).mean()),
                   acr_raw=float((f.get("radius_raw", f["radius"]) * ok).mean()),
                   s_per_image=float(f["time"].map(seconds).mean()))
        for r in radii:
            row[f"acc@{r}"] = float((ok & (f["radius"] >= r)).mean())
            row[f"acc_raw@{r}"] = float((ok & (f.get("radius_raw", f["radius"]) >= r)).mean())
        rows.append(row)
        ax = axes[0, args.sigmas.index(sigma)]
        grid = np.linspace(0, 2.0, 201)
        for col, ls in (("radius", "-"), ("radius_raw", ":")):
            if col == "radius_raw" and "radius_raw" not in f:
                continue
            acc = [(ok & (f[col] >= g)).mean() for g in grid]
            lbl = kind + (" (raw)" if col == "radius_raw" else "")
            ax.plot(grid, acc, ls, label=lbl, color="k" if kind == "cohen" else None)
        ax.set_title(f"CIFAR-10 ResNet-20, sigma = {sigma}, {len(common)} images, N = {args.N}")
        ax.set_xlabel("L2 radius (image space; dotted: the reference's raw radius)")
        ax.set_ylabel("certified accuracy")
    for ax in axes[0]:
        ax.legend(fontsize=7)
    out = pd.DataFrame(rows).sort_values(["sigma", "certifier"])
    out.to_csv(args.out_dir / f"smooth_reduce_summary_N{args.N}.tsv", sep="\t", index=False, float_format="%.4f")
    img = REPO / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(img / f"smooth_reduce_cifar10_N{args.N}.png", dpi=120)
    print(out.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("images:", sorted(common))


if __name__ == "__main__":
    a = parse()
    summary(a) if a.summary else run(a)
