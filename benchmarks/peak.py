"""The machine's arithmetic ceiling for a model: how many samples/s its peak FLOP rate allows.

A throughput figure means little without the ceiling it is measured against. This script measures

- the peak dense matmul rate (``--calls`` square ``--n`` x ``--n`` GEMMs per timing, median of
  ``--reps``) in float32 and bfloat16, in JAX (XLA, with the current XLA flags; float32 at JAX's
  default precision, which is TF32 on recent GPUs) and in PyTorch (its GEMM: oneDNN/MKL on CPU,
  cuBLAS on a GPU, float32 without TF32);
- the FLOPs of one forward pass of ``--model`` (XLA's own cost analysis of the compiled, BN-folded
  float32 forward at batch 1; a multiply-add counts 2);

and reports ``ceiling = peak FLOP/s / FLOPs per sample`` for each framework and dtype: the samples/s
that no implementation of the direct (non-Winograd) convolution network can exceed on this machine in
that dtype at the measured GEMM rates (a Winograd or FFT convolution does fewer multiplies and is
not bounded by it). With ``--throughput FILE`` (a ``benchmarks/results/throughput_*.json``) it adds the measured
rates as fractions of those ceilings. Output: a JSON file and one markdown row in ``benchmarks/results/``.

    python benchmarks/peak.py --model cifar_resnet110 --xla rsjax \\
        --throughput benchmarks/results/throughput_cifar_resnet110_b400_float32_cpu_<stamp>.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common  # noqa: E402

MD_HEADER = """\
| date (UTC) | model | device | GFLOP/sample | JAX f32 GFLOP/s | JAX bf16 GFLOP/s | torch f32 GFLOP/s | torch bf16 GFLOP/s | ceiling f32 samples/s | ceiling bf16 samples/s | measured (fraction of ceiling) |
|---|---|---|---|---|---|---|---|---|---|---|"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cifar_resnet110", choices=_common.MODELS)
    p.add_argument("--n", type=int, default=0, help="GEMM size (default: 2048 on CPU, 8192 on a GPU)")
    p.add_argument("--calls", type=int, default=10, help="GEMMs per timing (one synchronisation at the end)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--xla", default="default", choices=("default", "rsjax"))
    p.add_argument("--throughput", default=None, help="a throughput_*.json to express as fractions of the ceilings")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--torch-device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def median_seconds(fn, reps):
    import numpy as np

    fn()
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def jax_gemm_flops(n, dtype, reps, calls=10):
    """FLOP/s of ``calls`` back-to-back n x n GEMMs (default precision: TF32 for float32 on recent GPUs)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(jnp.matmul)

    def run():
        for _ in range(calls):
            out = mm(a, b)
        out.block_until_ready()

    return calls * 2 * n ** 3 / median_seconds(run, reps)


def torch_gemm_flops(n, dtype, reps, device="cpu", calls=10):
    """The same in PyTorch on ``device`` (its defaults: full float32 GEMMs, no TF32)."""
    import torch

    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        for _ in range(calls):
            a @ b
        sync()

    with torch.inference_mode():
        return calls * 2 * n ** 3 / median_seconds(run, reps)


def model_flops(arch):
    """FLOPs of one float32 forward (XLA cost analysis of the BN-folded network, batch 1)."""
    import jax
    import jax.numpy as jnp

    from rsjax.models import build_model, input_shape
    from rsjax.models.fold import fold_bn

    module = build_model(arch, 10 if arch != "resnet50" else 1000)
    x = jnp.zeros((1,) + input_shape(arch))
    model, variables = fold_bn(module, module.init(jax.random.key(0), x))
    cost = jax.jit(model.apply).lower(variables, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def main(argv=None):
    args = parse_args(argv)
    settings = {"xla": args.xla, "reps": args.reps}
    if args.xla == "rsjax":
        from rsjax import xla

        settings.update(xla.apply())
    load_start = os.getloadavg()
    import jax.numpy as jnp

    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    import jax

    args.n = args.n or (8192 if jax.default_backend() == "gpu" else 2048)
    settings["n"] = args.n
    settings["calls"] = args.calls
    rates = {"jax_float32": jax_gemm_flops(args.n, jnp.float32, args.reps, args.calls),
             "jax_bfloat16": jax_gemm_flops(args.n, jnp.bfloat16, args.reps, args.calls)}
    if not args.skip_torch:
        import torch

        settings["torch_device"] = dev = _common.torch_device(args.torch_device)
        rates["torch_float32"] = torch_gemm_flops(args.n, torch.float32, args.reps, dev, args.calls)
        rates["torch_bfloat16"] = torch_gemm_flops(args.n, torch.bfloat16, args.reps, dev, args.calls)
    log("GEMM GFLOP/s: " + ", ".join(f"{k} {v / 1e9:,.0f}" for k, v in rates.items()))
    flops = model_flops(args.model)
    f32_peak = max(v for k, v in rates.items() if k.endswith("float32"))
    bf16_peak = max(v for k, v in rates.items() if k.endswith("bfloat16"))
    rec = {
        "benchmark": "peak",
        "model": args.model,
        "batch": 1,  # the FLOP count's batch (file naming)
        "dtype": "float32+bfloat16",
        "model_flops_per_sample": flops,
        "gemm_flops_per_s": rates,
        "ceiling_samples_per_s": {"float32": f32_peak / flops, "bfloat16": bf16_peak / flops,
                                  **{k: v / flops for k, v in rates.items()}},
    }
    if args.throughput:
        tp = json.loads(Path(args.throughput).read_text())
        if tp.get("model") != args.model:
            raise SystemExit(f"{args.throughput} is for {tp.get('model')}, not {args.model}")
        measured = {"rsjax": (tp["rsjax_samples_per_s"], tp["dtype"]),
                    "torch_reference": (tp.get("torch_reference_samples_per_s"), "float32"),
                    "torch_tuned": (tp.get("torch_tuned_samples_per_s"),
                                    "bfloat16" if "bfloat16" in (tp.get("torch_tuned_variant") or "") else "float32")}
        rec["throughput_file"] = str(args.throughput)
        rec["measured_fraction_of_ceiling"] = {
            k: {"samples_per_s": v, "dtype": dt, "fraction": v / rec["ceiling_samples_per_s"][dt]}
            for k, (v, dt) in measured.items() if v}
    rec.update({"loadavg_start": load_start, "loadavg_end": os.getloadavg(), "settings": settings,
                "xla_flags": os.environ.get("XLA_FLAGS", ""), **_common.machine(),
                **{f"{k}_version": v for k, v in _common.versions().items()}})
    print(json.dumps(rec, indent=2))
    if not args.no_write:
        g = lambda k: f"{rates[k] / 1e9:,.0f}" if k in rates else "-"  # noqa: E731
        frac = rec.get("measured_fraction_of_ceiling", {})
        meas = ", ".join(f"{k} {v['samples_per_s']:,.0f} {v['dtype']} ({v['fraction']:.0%})" for k, v in frac.items())
        row = (f"| {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} | {args.model} | {_common.device_label(rec)} | "
               f"{flops / 1e9:.3f} | {g('jax_float32')} | {g('jax_bfloat16')} | {g('torch_float32')} | "
               f"{g('torch_bfloat16')} | {rec['ceiling_samples_per_s']['float32']:,.0f} | "
               f"{rec['ceiling_samples_per_s']['bfloat16']:,.0f} | {meas or '-'} |")
        path = _common.write_result("peak", rec, row, MD_HEADER)
        log(f"wrote {path}")
        print(row)
    return rec


if __name__ == "__main__":
    main()
