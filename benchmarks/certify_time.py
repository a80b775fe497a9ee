"""End-to-end seconds per certified image: ``rsjax certify`` vs the PyTorch reference CERTIFY loop.

On the same images (CIFAR-10 / MNIST test indices 0, skip, 2*skip, ... from ../shared/data),
model and weights:

Order A/B/A: rsjax, then PyTorch, then rsjax again (steady-state medians pool both rsjax runs).

- **rsjax**: the real command line, ``python -m rsjax certify DATASET MODEL SIGMA OUT --N0 --N
  --batch --skip --max`` in a subprocess, on a model converted with ``rsjax convert``'s converter
  (conversion not timed). Per-image seconds come from the TSV's ``time`` column; the first group
  of images also pays compilation, so the steady state is the median over the later rows (the
  wall time including start-up and compilation is recorded too).
- **PyTorch reference**: Cohen et al.'s ``Smooth.certify`` (``_sample_noise`` for n0, then n,
  Clopper-Pearson lower bound, ``sigma * norm.ppf(pA)``), timed per image in eval mode.
- **raw sampling rate** of rsjax (``make_counter`` on the same classifier, batch and n) measured
  in this process before and after; the driver must stay within 5% of it:
  ``(n0 + n) / seconds_per_image >= 0.95 * raw``.

The default n (``--N 2000``) is smaller than Cohen's 100,000 so that a 2-core CPU finishes in
minutes; the per-image time scales linearly in n0 + n (stated in the output).

    python benchmarks/certify_time.py --model cifar_resnet110 --batch 400 --N 2000 --images 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common  # noqa: E402

MD_HEADER = """\
| date (UTC) | model | batch | dtype | N0 + N | device | rsjax certify s/image | PyTorch reference s/image | speed-up | rsjax end-to-end / raw sampling rate | load 1-min (start/end) | cpu kernels |
|---|---|---|---|---|---|---|---|---|---|---|---|"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cifar_resnet110", choices=("cifar_resnet110", "cifar_resnet20", "lenet"))
    p.add_argument("--checkpoint", default=None, help="PyTorch checkpoint of --model (default: random weights)")
    p.add_argument("--batch", type=int, default=400)
    p.add_argument("--N0", type=int, default=100)
    p.add_argument("--N", type=int, default=2000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--images", type=int, default=8,
                   help="images certified by each contender (use >= 2 CLI groups: the first one compiles)")
    p.add_argument("--skip", type=int, default=20)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--xla", default="default", choices=("default", "rsjax"))
    p.add_argument("--torch-device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="device of the PyTorch reference (auto: cuda when PyTorch sees a GPU)")
    p.add_argument("--cpu-kernels", default="xla", choices=("auto", "onednn", "xla"),
                   help="rsjax's CPU convolution kernels (rsjax certify --cpu-kernels; the raw rate uses the same)")
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def cohen_certify(model, x, n0, n, alpha, batch, sigma, num_classes):
    """Cohen et al. ``Smooth.certify`` (core.py) with its ``_sample_noise``; statsmodels'
    ``proportion_confint(method="beta")`` lower bound is ``beta.ppf(alpha, k, n - k + 1)``."""
    import numpy as np
    import torch
    from scipy.stats import beta, norm

    def _sample_noise(num):
        return _common.cohen_sample_noise(model, x, num, batch, sigma, num_classes)

    model.eval()
    c_hat = _sample_noise(n0).argmax().item()
    counts = _sample_noise(n)
    k = counts[c_hat].item()
    p_a = beta.ppf(alpha, k, n - k + 1) if k > 0 else 0.0
    if p_a < 0.5:
        return -1, 0.0
    return c_hat, sigma * norm.ppf(p_a)


def torch_reference(model, xs, idx, labels, meta, args, log):
    import numpy as np
    import torch

    times, rows = [], []
    for i in range(len(idx)):
        x = torch.from_numpy(np.ascontiguousarray(xs[i].transpose(2, 0, 1))).to(args.torch_dev)
        t = time.perf_counter()
        pred, radius = cohen_certify(model, x, args.N0, args.N, args.alpha, args.batch, args.sigma, meta["num_classes"])
        times.append(time.perf_counter() - t)
        rows.append((int(idx[i]), int(labels[i]), int(pred), float(radius)))
        log(f"PyTorch reference image {idx[i]}: {times[-1]:.2f} s")
    return times, rows


def raw_rate(model_dir, args, x0):
    """(samples/s of make_counter on the classifier `rsjax certify` loads, n draws of one image;
    that classifier's layout: fold_bn, pack_narrow)."""
    import jax.numpy as jnp
    import numpy as np

    from rsjax.classifier import load_classifier
    from rsjax.core.sampler import image_keys, make_counter

    from rsjax.xla import pack_narrow_convs

    f, meta = load_classifier(model_dir, dtype=args.dtype, pack_narrow=pack_narrow_convs(),
                              cpu_kernels=args.cpu_kernels)
    counts = make_counter(f, meta["num_classes"], samples_per_step=min(args.batch, args.N))
    x = jnp.asarray(x0[None])
    s = jnp.full((1,), args.sigma, jnp.float32)
    np.asarray(counts(x, s, image_keys(0, np.array([0])), num=args.N))
    ts = []
    for r in range(2):
        t = time.perf_counter()
        np.asarray(counts(x, s, image_keys(0, np.array([r + 1])), num=args.N))
        ts.append(time.perf_counter() - t)
    return args.N / min(ts), {"fold_bn": meta["fold_bn"], "pack_narrow": meta["pack_narrow"],
                              "cpu_kernels": meta.get("cpu_kernels", "xla")}


def main(argv=None):
    args = parse_args(argv)
    settings = {"xla": args.xla}
    if args.xla == "rsjax":
        from rsjax import xla

        settings.update(xla.apply())
    load_start = os.getloadavg()
    import numpy as np
    import torch

    from converters.pytorch import convert_checkpoint
    from rsjax.data import load_dataset
    from rsjax.paths import SHARED_DATA

    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    args.torch_dev = _common.torch_device(args.torch_device)
    settings["torch_device"] = args.torch_dev
    model, sd, meta = _common.torch_model(args.model, args.checkpoint, device=args.torch_dev)
    ds_name = meta["dataset"]
    ds = load_dataset(ds_name, "test", SHARED_DATA / ds_name)
    idx = np.arange(0, args.images * args.skip, args.skip)
    xs, labels = ds.batch(idx)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "checkpoint.pth.tar"
        torch.save({"arch": args.model, "epoch": 0, "state_dict": {f"1.{k}": v for k, v in sd.items()}}, ckpt)
        model_dir = tmp / "model"
        convert_checkpoint(ckpt, model_dir, dataset=ds_name, log=lambda *a: None)

        raw_before, layout = raw_rate(model_dir, args, xs[0])
        log(f"rsjax raw sampling rate {raw_before:,.0f} samples/s")

        def run_cli(name):
            out = tmp / name
            cmd = [sys.executable, "-m", "rsjax", "certify", ds_name, str(model_dir), str(args.sigma), str(out),
                   "--N0", str(args.N0), "--N", str(args.N), "--alpha", str(args.alpha), "--batch", str(args.batch),
                   "--skip", str(args.skip), "--max", str(int(idx[-1]) + 1), "--dtype", args.dtype,
                   "--data-dir", str(SHARED_DATA / ds_name), "--no-progress", "--cpu-kernels", args.cpu_kernels]
            t = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            wall = time.perf_counter() - t
            if r.returncode != 0:
                raise SystemExit(f"rsjax certify failed ({r.returncode}): {r.stderr[-2000:]}")
            lines = [ln for ln in out.read_text().splitlines() if not ln.startswith("#")]
            header, rows = lines[0].split("\t"), [ln.split("\t") for ln in lines[1:]]
            per_image = [float(row[header.index("time")]) for row in rows]
            log(f"rsjax certify: {len(rows)} images, wall {wall:.1f} s, per-image times {per_image}")
            return per_image, wall

        # A/B/A: rsjax CLI, PyTorch reference, rsjax CLI again (load drift hits both)
        runs = [run_cli("certify_a.tsv")]
        torch_times, torch_rows = torch_reference(model, xs, idx, labels, meta, args, log)
        runs.append(run_cli("certify_b.tsv"))
        raw_after, _ = raw_rate(model_dir, args, xs[0])
        log(f"rsjax raw sampling rate after {raw_after:,.0f} samples/s")

    load_end = os.getloadavg()

    # steady state: the CLI certifies images in groups (several images share the n0 steps), and
    # every row of a group records the group's time / its size. The first group pays compilation
    # and a padded last group compiles its padding, so the median is over the full groups after
    # the first (all groups if there is only one).
    steady = []
    for per_image, _ in runs:
        groups = [[per_image[0]]]
        for t in per_image[1:]:
            (groups[-1].append(t) if t == groups[-1][-1] else groups.append([t]))
        full = max(len(g) for g in groups)
        steady += [g[0] for g in groups[1:] if len(g) == full] or [g[0] for g in groups]
    rs_s = float(np.median(steady))
    th_s = float(np.median(torch_times))
    raw = max(raw_before, raw_after)
    e2e_rate = (args.N0 + args.N) / rs_s
    rec = {
        "benchmark": "certify_time",
        "model": args.model,
        "weights": meta["weights"],
        "batch": args.batch,
        "dtype": args.dtype,
        "N0": args.N0,
        "N": args.N,
        "alpha": args.alpha,
        "sigma": args.sigma,
        "images": idx.tolist(),
        "rsjax_seconds_per_image": rs_s,
        "rsjax_seconds_per_image_all_rows": [r[0] for r in runs],
        "rsjax_steady_group_seconds_per_image": steady,
        "rsjax_wall_seconds_including_startup_and_compile": [r[1] for r in runs],
        "torch_reference_seconds_per_image": th_s,
        "torch_reference_seconds_all": torch_times,
        "speedup_vs_reference": th_s / rs_s,
        "rsjax_end_to_end_samples_per_s": e2e_rate,
        "rsjax_raw_samples_per_s": raw,
        "rsjax_raw_samples_per_s_before_after": [raw_before, raw_after],
        "end_to_end_over_raw": e2e_rate / raw,
        "within_5_percent_of_raw": e2e_rate >= 0.95 * raw,
        "scaled_to_N100000_rsjax_seconds_per_image": rs_s * (args.N0 + 100_000) / (args.N0 + args.N),
        "scaled_to_N100000_torch_seconds_per_image": th_s * (args.N0 + 100_000) / (args.N0 + args.N),
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "settings": settings,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        **_common.machine(),
        **{f"{k}_version": v for k, v in _common.versions().items()},
    }
    rec["same_device"] = _common.same_device_note(rec, args.torch_dev, log)
    settings.update(layout)
    print(json.dumps(rec, indent=2))
    if not args.no_write:
        dev = _common.device_label(rec)
        row = (f"| {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} | {args.model} | {args.batch} | {args.dtype} | "
               f"{args.N0} + {args.N} | {dev} | {rs_s:.2f} | {th_s:.2f} | {th_s / rs_s:.2f}x | "
               f"{e2e_rate / raw:.3f} | {load_start[0]:.1f}/{load_end[0]:.1f} | {settings['cpu_kernels']} |")
        path = _common.write_result("certify_time", rec, row, MD_HEADER)
        log(f"wrote {path}")
        print(row)
    return rec


if __name__ == "__main__":
    main()
