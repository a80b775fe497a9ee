"""Per-layer timing of a model's convolutions: oneDNN's primitive alone (benchdnn-style, no JAX),
the same fused convolution through the jax.ffi custom call, XLA's convolution + epilogue, and
PyTorch's (oneDNN inside) convolution + epilogue in channels_last.

For every distinct convolution problem of ``--model`` (shape, stride, fused bias/ReLU/residual
sum) at ``--batch``, in ``--dtype``: the implementation oneDNN picks, best-of-``--reps`` seconds
of each path, and GFLOP/s (a multiply-add counts 2), weighted by how often the problem occurs.
This says which layer shapes hold a model back and what oneDNN itself reaches on them.
Output: a JSON file in benchmarks/results/ (onednn_layers_*.json) and a markdown table on stdout.

    python benchmarks/onednn_layers.py --model cifar_resnet110 --batch 400 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cifar_resnet110", choices=_common.MODELS)
    p.add_argument("--batch", type=int, default=400)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def best(fn, reps):
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def problems(arch, dtype):
    """Counter of the oneDNN problems of ``arch`` (random folded weights: only shapes matter)."""
    import jax
    import jax.numpy as jnp

    from rsjax.kernels.onednn import onednn_model
    from rsjax.models import build_model, input_shape
    from rsjax.models.fold import fold_bn

    module = build_model(arch, 10, dtype=jnp.dtype(dtype))
    shape = input_shape(arch)
    variables = module.init(jax.random.key(0), jnp.zeros((1,) + shape))
    folded, fv = fold_bn(module, variables)
    model, _ = onednn_model(module, fv, shape, folded_paths=folded.folded_paths)
    return Counter(model.router.problems.values())


def main(argv=None):
    args = parse_args(argv)
    load_start = os.getloadavg()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rsjax.kernels import onednn

    dt = jnp.dtype(args.dtype)
    n = args.batch
    rows = []
    for params, count in problems(args.model, args.dtype).items():
        _, h, w, c, o, kh, kw, sh, sw, pt, pb, pl, pr, relu, ssum, has_bias = params
        oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
        flops = 2.0 * n * oh * ow * o * c * kh * kw
        t_prim = onednn.primitive_time(params, n, args.reps)
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(n, h, w, c)), dt)
        kernel = jnp.asarray(rng.normal(size=(kh, kw, c, o)) * 0.1, jnp.float32)
        bias = jnp.asarray(rng.normal(size=(o,)), jnp.float32)
        res = jnp.asarray(rng.normal(size=(n, oh, ow, o)), dt) if ssum else None
        blob = jnp.asarray(onednn.prepare_blob(params, np.asarray(kernel)))
        ffi = jax.jit(lambda x, r: onednn.onednn_conv(x, blob, bias, r, params))
        xla = jax.jit(lambda x, r: onednn.xla_conv(x, kernel, bias, r, params))
        t_ffi = best(lambda: ffi(x, res).block_until_ready(), args.reps)
        t_xla = best(lambda: xla(x, res).block_until_ready(), args.reps)
        t_torch = None
        if not args.skip_torch:
            import torch

            tdt = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
            conv = torch.nn.Conv2d(c, o, (kh, kw), (sh, sw), bias=True).to(memory_format=torch.channels_last)
            xt = torch.randn(n, c, h + pt + pb, w + pl + pr).to(memory_format=torch.channels_last)
            rt = torch.randn(n, o, oh, ow).to(memory_format=torch.channels_last) if ssum else None

            def torch_run():
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=tdt == torch.bfloat16):
                    y = conv(xt)
                    if rt is not None:
                        y = y + rt
                    if relu:
                        y = torch.relu(y)
                    return y

            t_torch = best(torch_run, args.reps)
        rows.append({"problem": list(params), "count": count, "in": [h, w, c], "out": [oh, ow, o],
                     "kernel": [kh, kw], "stride": [sh, sw], "relu": bool(relu), "sum": bool(ssum),
                     "impl": onednn.primitive_info(params, n), "gflop": flops / 1e9,
                     "seconds": {"onednn_primitive": t_prim, "onednn_ffi": t_ffi, "xla": t_xla, "torch": t_torch}})
        r = rows[-1]
        print(f"{r['in']} -> {r['out']} k{kh} s{sh} relu={bool(relu)} sum={bool(ssum)} x{count}: {r['impl']}; "
              + ", ".join(f"{k} {flops / v / 1e9:.0f} GFLOP/s" for k, v in r["seconds"].items() if v),
              file=sys.stderr, flush=True)
    totals = {k: sum(r["count"] * r["seconds"][k] for r in rows) for k in rows[0]["seconds"]
              if all(r["seconds"][k] for r in rows)}
    rec = {"benchmark": "onednn_layers", "model": args.model, "batch": n, "dtype": args.dtype, "layers": rows,
           "conv_seconds_per_batch": totals,
           "conv_samples_per_s": {k: n / v for k, v in totals.items()},
           "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
           "note": "machine shared with other jobs when the load average exceeds the core count",
           **_common.machine(), **{f"{k}_version": v for k, v in _common.versions().items()}}
    print("| input HWC | output HWC | k/s | epilogue | x | oneDNN impl | primitive GFLOP/s | ffi GFLOP/s | XLA GFLOP/s"
          " | torch GFLOP/s |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["seconds"]
        g = lambda v: f"{r['gflop'] / v:.0f}" if v else "-"  # noqa: E731
        epi = "+".join(e for e, on in (("bias", True), ("sum", r["sum"]), ("relu", r["relu"])) if on)
        print(f"| {r['in']} | {r['out']} | {r['kernel'][0]}/{r['stride'][0]} | {epi} | {r['count']} | {r['impl']} | "
              f"{g(s['onednn_primitive'])} | {g(s['onednn_ffi'])} | {g(s['xla'])} | {g(s['torch'])} |")
    print("conv-only samples/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in rec["conv_samples_per_s"].items()))
    if not args.no_write:
        _common.RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = _common.RESULTS / f"onednn_layers_{args.model}_b{n}_{args.dtype}_{stamp}.json"
        path.write_text(json.dumps(rec, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return rec


if __name__ == "__main__":
    main()
