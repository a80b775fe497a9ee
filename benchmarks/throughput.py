"""Noisy samples per second of the sampling step (noise + forward + argmax + counting).

Compares, on the same machine, model, weights and batch size:

1. **rsjax**: :func:`rsjax.core.sampler.make_counter` (one jitted scan: noise, forward, argmax and
   histogram on the device; only the counts come back), with BatchNorm folded (``--no-fold`` to
   disable), narrow convolutions width-packed where that helps (``--pack``) and the forward in ``--dtype``;
2. **PyTorch reference**: Cohen et al.'s ``Smooth._sample_noise`` exactly (``x.repeat``,
   ``randn_like``, forward, ``argmax``, ``.cpu().numpy()`` and the Python ``_count_arr`` loop), in
   eval mode under ``no_grad``;
3. **tuned PyTorch**: ``inference_mode``, on-device ``bincount``, and the fastest of float32 /
   bfloat16 autocast (where the device supports it) x contiguous / channels_last, plus
   ``torch.compile`` of that variant when it works on the machine (``--torch-compile``).

After warm-up (compilation, and a short calibration that picks the tuned variant) the three are
timed in turn, ``--reps`` times (A/B/C alternation, so that load changes hit all three alike),
each timing ``--steps`` batches; the medians are reported. Output: a JSON file and one markdown
row in ``benchmarks/results/`` (see benchmarks/README.md). The load average of the machine is
recorded before and after, because a shared machine makes every figure noisy.

    python benchmarks/throughput.py --model cifar_resnet110 --batch 400 [--dtype bfloat16] [--xla rsjax]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common  # noqa: E402

MD_HEADER = """\
| date (UTC) | model | batch | rsjax dtype | device | rsjax samples/s | PyTorch reference | tuned PyTorch (variant) | vs reference | vs tuned | load 1-min (start/end) | settings |
|---|---|---|---|---|---|---|---|---|---|---|---|"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cifar_resnet110", choices=_common.MODELS)
    p.add_argument("--batch", type=int, default=400, help="forward batch (noisy copies per step)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="rsjax forward dtype")
    p.add_argument("--checkpoint", default=None, help="a PyTorch checkpoint of --model (default: random weights)")
    p.add_argument("--no-fold", action="store_true", help="do not fold BatchNorm into the convolutions (rsjax)")
    p.add_argument("--pack", default="auto", choices=("auto", "on", "off"),
                   help="width-pack narrow convolutions (rsjax.models.pack); auto: where rsjax.xla says it helps")
    p.add_argument("--xla", default="default", choices=("default", "rsjax"),
                   help="'rsjax': apply rsjax.xla's recommended settings before JAX starts")
    p.add_argument("--cpu-kernels", default="xla", choices=("auto", "onednn", "xla"),
                   help="rsjax convolutions on CPU: oneDNN with fused epilogues (rsjax.kernels.onednn) or XLA's")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of each contender (median reported)")
    p.add_argument("--steps", type=int, default=2, help="batches per timed repetition")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--torch-compile", default="auto", choices=("auto", "on", "off"),
                   help="try torch.compile for tuned PyTorch (auto: use it if it compiles and is faster)")
    p.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    p.add_argument("--torch-device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="device of the PyTorch contenders (auto: cuda when PyTorch sees a GPU)")
    p.add_argument("--skip-torch", action="store_true", help="measure rsjax only")
    p.add_argument("--compare-rev", default=None, metavar="REV",
                   help="also time rsjax.core.sampler.make_counter as it was at git revision REV (same classifier, "
                        "interleaved with the others): a before/after record of a change to the counter")
    p.add_argument("--no-write", action="store_true", help="print the JSON, write nothing")
    return p.parse_args(argv)


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------ contenders

def sampler_at(rev: str):
    """``rsjax/core/sampler.py`` as it was at git revision ``rev``, imported as a module of its own."""
    import importlib.util
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parent.parent
    src = subprocess.run(["git", "-C", str(root), "show", f"{rev}:rsjax/core/sampler.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"sampler_{rev.replace('/', '_')}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rsjax_runner(state_dict, meta, args, sampler=None):
    """Returns (run(rep) -> counts, noise_rate): one call draws batch*steps samples of one image.
    ``sampler``: the module whose ``make_counter`` is timed (default: today's rsjax.core.sampler)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rsjax.core import sampler as current
    from rsjax.core.sampler import image_keys, noisy_copies

    sampler = sampler or current
    f = _common.rsjax_classifier(state_dict, meta, dtype=args.dtype, fold=not args.no_fold, pack=args.pack_narrow,
                                 cpu_kernels=args.cpu_kernels_used).f
    h, w, c = meta["input_shape"]
    x = jax.random.uniform(jax.random.key(123), (1, h, w, c))
    sigma = jnp.full((1,), args.sigma, jnp.float32)
    counts = sampler.make_counter(f, meta["num_classes"], samples_per_step=args.batch)
    num = args.batch * args.steps

    def run(rep):
        return np.asarray(counts(x, sigma, image_keys(0, np.array([rep])), num=num))

    # noise generation alone (the same per-sample fold_in + normal as the counter)
    noise = jax.jit(lambda k, off: noisy_copies(x[0], sigma[0], k, off + jnp.arange(args.batch, dtype=jnp.uint32)))
    k0 = image_keys(0, np.array([0]))[0]
    noise(k0, jnp.uint32(0)).block_until_ready()
    t = min(timed(lambda: noise(k0, jnp.uint32(i)).block_until_ready()) for i in range(5))
    return run, args.batch / t


def torch_reference_runner(model, meta, args):
    """Cohen's Smooth._sample_noise, verbatim apart from the device (this machine's)."""
    import numpy as np
    import torch

    h, w, c = meta["input_shape"]
    x = torch.rand(c, h, w, generator=torch.Generator().manual_seed(123)).to(args.torch_dev)
    num_classes, batch_size, sigma = meta["num_classes"], args.batch, args.sigma

    def _sample_noise(num):
        return _common.cohen_sample_noise(model, x, num, batch_size, sigma, num_classes)

    return lambda rep: _sample_noise(batch_size * args.steps)


def torch_tuned_candidates(model, meta, args):
    """{name: run(rep)} for the eager tuned variants this device supports."""
    import copy

    import torch

    h, w, c = meta["input_shape"]
    x = torch.rand(1, c, h, w, generator=torch.Generator().manual_seed(123)).to(args.torch_dev)
    nc, b, sigma, steps = meta["num_classes"], args.batch, args.sigma, args.steps
    out = {}
    for layout in ("contiguous", "channels_last"):
        m = copy.deepcopy(model)
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        m = m.to(memory_format=fmt)
        for dtype in ("float32", "bfloat16") if _bf16_ok(args.torch_dev) else ("float32",):
            out[f"{dtype}+{layout}"] = _tuned_loop(m, x, fmt, dtype, nc, b, sigma, steps)
    return out


def _bf16_ok(device):
    """bfloat16 autocast where the device has fast bfloat16: AVX512-BF16 CPUs, bf16-capable GPUs."""
    import torch

    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    f = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and f and f())


def _tuned_loop(m, x, fmt, dtype, nc, b, sigma, steps):
    """Tuned sampling: inference_mode, the layout ``fmt``, autocast, on-device bincount, cuDNN autotuning
    on a GPU; the counts' copy to the host ends the call (and waits for the device)."""
    import torch

    xb = x.repeat(b, 1, 1, 1).contiguous(memory_format=fmt)
    dev = xb.device.type

    def run(rep, m=m):
        bench = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True  # tuned only: Cohen's code leaves it off
        try:
            with torch.inference_mode(), torch.autocast(dev, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                counts = torch.zeros(nc, dtype=torch.int64, device=xb.device)
                for _ in range(steps):
                    pred = m(xb + sigma * torch.randn_like(xb)).argmax(1)
                    counts += torch.bincount(pred, minlength=nc)
                return counts.cpu().numpy()
        finally:
            torch.backends.cudnn.benchmark = bench

    return run


def pick_tuned(cands, log):
    """Fastest candidate over two warm calls each; returns (name, run, {name: samples/s})."""
    rates = {}
    for name, run in cands.items():
        try:
            run(0)
            rates[name] = min(timed(lambda: run(1)) for _ in range(2))
        except Exception as e:  # noqa: BLE001 - a variant the machine cannot run is skipped
            log(f"tuned PyTorch variant {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    best = min(rates, key=rates.get)
    return best, cands[best], rates


def try_compile(model, meta, args, variant, log):
    """torch.compile of the tuned variant, or None if it fails on this machine."""
    import copy

    import torch

    dtype, layout = variant.split("+")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    try:
        m = torch.compile(copy.deepcopy(model).to(memory_format=fmt))
        h, w, c = meta["input_shape"]
        x = torch.rand(1, c, h, w, generator=torch.Generator().manual_seed(123)).to(args.torch_dev)
        run = _tuned_loop(m, x, fmt, dtype, meta["num_classes"], args.batch, args.sigma, args.steps)
        t = time.perf_counter()
        run(0)
        log(f"torch.compile({variant}) compiled in {time.perf_counter() - t:.0f} s")
        return run
    except Exception as e:  # noqa: BLE001
        log(f"torch.compile failed on this machine: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}")
        return None


# ------------------------------------------------------------------------------------ main

def main(argv=None):
    args = parse_args(argv)
    settings = {"xla": args.xla, "fold_bn": not args.no_fold}
    if args.xla == "rsjax":
        from rsjax import xla

        settings.update(xla.apply())
    load_start = os.getloadavg()
    import jax
    import numpy as np

    from rsjax.xla import pack_narrow_convs

    from rsjax.kernels.onednn import resolve

    args.cpu_kernels_used = "onednn" if resolve(args.cpu_kernels) and not args.no_fold else "xla"
    settings["cpu_kernels"] = args.cpu_kernels_used
    args.pack_narrow = pack_narrow_convs(folded=not args.no_fold) if args.pack == "auto" else args.pack == "on"
    args.pack_narrow = args.pack_narrow and args.cpu_kernels_used == "xla"
    settings["pack_narrow"] = args.pack_narrow
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    args.torch_dev = "cpu" if args.skip_torch else _common.torch_device(args.torch_device)
    model, sd, meta = _common.torch_model(args.model, args.checkpoint, device=args.torch_dev)
    samples = args.batch * args.steps

    t = time.perf_counter()
    rs_run, noise_rate = rsjax_runner(sd, meta, args)
    rs_run(0)
    log(f"rsjax compiled + first run in {time.perf_counter() - t:.1f} s; noise alone {noise_rate:,.0f} samples/s")
    contenders = {"rsjax": rs_run}
    if args.compare_rev:
        old_run, _ = rsjax_runner(sd, meta, args, sampler=sampler_at(args.compare_rev))
        a, b = rs_run(1), old_run(1)
        assert (a[:, : b.shape[1]] == b).all(), "the two revisions' counters disagree"
        settings["compare_rev"] = args.compare_rev
        contenders[f"rsjax@{args.compare_rev}"] = old_run
    tuned_name, tuned_rates = None, {}
    if not args.skip_torch:
        import torch

        settings["torch_threads"] = torch.get_num_threads()
        settings["torch_device"] = args.torch_dev
        contenders["torch_reference"] = torch_reference_runner(model, meta, args)
        contenders["torch_reference"](0)
        tuned_name, tuned_run, tuned_rates = pick_tuned(torch_tuned_candidates(model, meta, args), log)
        tuned_rates = {k: samples / v for k, v in tuned_rates.items()}
        if args.torch_compile != "off":
            compiled = try_compile(model, meta, args, tuned_name, log)
            if compiled is not None:
                tc = samples / min(timed(lambda: compiled(1)) for _ in range(2))
                tuned_rates[f"compiled {tuned_name}"] = tc
                if args.torch_compile == "on" or tc > tuned_rates[tuned_name]:
                    tuned_name, tuned_run = f"compiled {tuned_name}", compiled
        log("tuned PyTorch candidates (samples/s): " + ", ".join(f"{k} {v:,.0f}" for k, v in tuned_rates.items()))
        contenders["torch_tuned"] = tuned_run

    times = {k: [] for k in contenders}
    cpu = {k: [] for k in contenders}  # process CPU seconds (all threads): a load-robust cost
    for rep in range(args.reps):
        for name, run in contenders.items():
            c0 = time.process_time()
            times[name].append(timed(lambda: run(rep + 2)))
            cpu[name].append(time.process_time() - c0)
        log(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{k} {samples / v[-1]:,.0f}/s" for k, v in times.items()))
    rates = {k: samples / float(np.median(v)) for k, v in times.items()}
    load_end = os.getloadavg()

    rec = {
        "benchmark": "throughput",
        "model": args.model,
        "weights": meta["weights"],
        "batch": args.batch,
        "dtype": args.dtype,
        "rsjax_samples_per_s": rates["rsjax"],
        "torch_reference_samples_per_s": rates.get("torch_reference"),
        "torch_tuned_samples_per_s": rates.get("torch_tuned"),
        "torch_tuned_variant": tuned_name,
        "torch_tuned_candidates_samples_per_s": tuned_rates,
        "ratio_vs_reference": rates["rsjax"] / rates["torch_reference"] if "torch_reference" in rates else None,
        "ratio_vs_tuned": rates["rsjax"] / rates["torch_tuned"] if "torch_tuned" in rates else None,
        # ratios within each repetition (the contenders ran back to back): robust to slow load drift
        "ratio_vs_reference_per_rep": ([r / t for r, t in zip(times["torch_reference"], times["rsjax"])]
                                       if "torch_reference" in times else None),
        "ratio_vs_tuned_per_rep": ([r / t for r, t in zip(times["torch_tuned"], times["rsjax"])]
                                   if "torch_tuned" in times else None),
        "rsjax_noise_only_samples_per_s": noise_rate,
        "rsjax_at_rev_samples_per_s": rates.get(f"rsjax@{args.compare_rev}") if args.compare_rev else None,
        "rsjax_vs_rev_per_rep": ([o / n for o, n in zip(times[f"rsjax@{args.compare_rev}"], times["rsjax"])]
                                 if args.compare_rev else None),
        "reps": args.reps,
        "samples_per_rep": samples,
        "seconds_per_rep": {k: v for k, v in times.items()},
        "cpu_seconds_per_rep": cpu,
        "samples_per_cpu_second": {k: samples / float(np.median(v)) for k, v in cpu.items()},
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "settings": settings,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        **_common.machine(),
        **{f"{k}_version": v for k, v in _common.versions().items()},
    }
    if not args.skip_torch:
        rec["same_device"] = _common.same_device_note(rec, args.torch_dev, log)
    import json

    print(json.dumps(rec, indent=2))
    if not args.no_write:
        fmt = lambda v: f"{v:,.0f}" if v is not None else "-"  # noqa: E731
        ratio = lambda v: f"{v:.2f}x" if v is not None else "-"  # noqa: E731
        dev = _common.device_label(rec)
        old_note = f", {args.compare_rev}: {fmt(rec['rsjax_at_rev_samples_per_s'])}" if args.compare_rev else ""
        row = (f"| {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} | {args.model} | {args.batch} | {args.dtype} | {dev} | "
               f"{fmt(rec['rsjax_samples_per_s'])} | {fmt(rec['torch_reference_samples_per_s'])} | "
               f"{fmt(rec['torch_tuned_samples_per_s'])} ({tuned_name or '-'}) | {ratio(rec['ratio_vs_reference'])} | "
               f"{ratio(rec['ratio_vs_tuned'])} | {load_start[0]:.1f}/{load_end[0]:.1f} | "
               f"xla={args.xla}, fold={not args.no_fold}, pack={args.pack_narrow}, cpu_kernels={args.cpu_kernels_used}"
               f"{old_note}"
               f"{'' if args.skip_torch else f', torch on {args.torch_dev}'} |")
        path = _common.write_result("throughput", rec, row, MD_HEADER)
        log(f"wrote {path}")
        print(row)
    return rec


if __name__ == "__main__":
    main()
