"""rsjax's sampling step with oneDNN convolutions against the same step with XLA's, interleaved.

The same random-weight ``--model``, the same counter (:func:`rsjax.core.sampler.make_counter`,
noise + forward + argmax + counting in one jitted scan), ``--batch`` noisy copies per step, the
forward in float32 and in bfloat16; the XLA path with rsjax.xla's settings and width packing where
rsjax.xla recommends it. The four contenders are timed in turn ``--reps`` times; the medians and
the per-repetition oneDNN/XLA ratios are written to benchmarks/results/onednn_ab_*.json.

    python benchmarks/onednn_ab.py --model cifar_resnet110 --batch 400
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cifar_resnet110", choices=_common.MODELS)
    p.add_argument("--batch", type=int, default=400)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    from rsjax import xla as rsxla

    xla_settings = rsxla.apply()
    load_start = os.getloadavg()
    import jax
    import numpy as np

    from converters.pytorch import torch_to_flax
    from rsjax.core.sampler import image_keys, make_counter
    from rsjax.kernels.onednn import onednn_classifier
    from rsjax.models.fold import fold_variables

    _, sd, meta = _common.torch_model(args.model)
    pack = rsxla.pack_narrow_convs(folded=True)
    h, w, c = meta["input_shape"]
    x = jax.random.uniform(jax.random.key(123), (1, h, w, c))
    sigma = np.full((1,), 0.25, np.float32)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        fx, _ = _common.rsjax_classifier(sd, meta, dtype=dtype, fold=True, pack=pack)
        variables, folded = fold_variables(torch_to_flax(sd, meta["arch"], meta["num_classes"]))
        fo = onednn_classifier(meta["arch"], meta["num_classes"], jax.device_put(variables), meta["mean"],
                               meta["std"], dtype=dtype, folded_paths=folded)
        for kind, f in (("xla", fx), ("onednn", fo)):
            counts = make_counter(f, meta["num_classes"], samples_per_step=args.batch)
            runs[f"{kind}_{dtype}"] = (lambda counts=counts: lambda rep: np.asarray(
                counts(x, sigma, image_keys(0, np.array([rep])), num=args.batch)))()
    times = {k: [] for k in runs}
    for k, run in runs.items():
        run(0)
    for rep in range(args.reps):
        for k, run in runs.items():
            t = time.perf_counter()
            run(rep + 1)
            times[k].append(time.perf_counter() - t)
        print(f"rep {rep + 1}: " + ", ".join(f"{k} {args.batch / v[-1]:,.0f}/s" for k, v in times.items()),
              file=sys.stderr, flush=True)
    rates = {k: args.batch / float(np.median(v)) for k, v in times.items()}
    ratios = {d: [tx / to for tx, to in zip(times[f"xla_{d}"], times[f"onednn_{d}"])] for d in ("float32", "bfloat16")}
    rec = {"benchmark": "onednn_ab", "model": args.model, "batch": args.batch, "weights": "random",
           "samples_per_s": rates, "onednn_over_xla_per_rep": ratios, "seconds_per_rep": times,
           "xla_pack_narrow": pack, "xla_settings": xla_settings, "loadavg_start": load_start,
           "loadavg_end": os.getloadavg(), "machine_shared": os.getloadavg()[0] > (os.cpu_count() or 1),
           **_common.machine(), **{f"{k}_version": v for k, v in _common.versions().items()}}
    print(json.dumps(rec, indent=2))
    if not args.no_write:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = _common.RESULTS / f"onednn_ab_{args.model}_b{args.batch}_cpu_{stamp}.json"
        path.write_text(json.dumps(rec, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
