"""Cost of the input-specific sigma methods against plain Cohen CERTIFY, and of QCRS's vectorised
grid search against the reference's sequential bisection, on one model and the same images.

    python benchmarks/methods.py [--model PATH] [--dataset cifar10] [--sigma 0.25] [--N 2000]
                                 [--images 4] [--batch 1000] [--out benchmarks/results/methods]
                                 [--qcrs-budget 3%] [--methods cohen,qcrs,qcrs-budget]
    python benchmarks/methods.py tables OUT1.tsv OUT2.tsv ...   # certified-accuracy table

For each method the sigma choice ("search") is timed separately from the CERTIFY that follows
(the same for every method: n0 = 100, n = N draws at the chosen sigma). Every timing is a
second, warm call (compilation excluded) on the same images; the first call on other indices
compiles. Reported per image: search seconds, CERTIFY seconds, overhead = search / CERTIFY,
draws spent on the search (machine independent), and the draws overhead at the paper's
N = 100,000. QCRS search: grid vs bisection - sequential sampler calls, draws, seconds.
``--qcrs-budget B`` adds the row ``qcrs-budget`` (grid search with that budget, the reference's
settings otherwise); a percentage is of the paper's N = 100,000 (the N the overhead is projected
to), not of the small benchmark N. ``--methods`` restricts the rows (cohen is always measured).
Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rsjax.cli.certify import load_model  # noqa: E402
from rsjax.core.certify import Smoother  # noqa: E402
from rsjax.data import load_dataset  # noqa: E402
from rsjax.methods import get_method  # noqa: E402
from rsjax.methods.instars import draws_per_image, start_set  # noqa: E402
from rsjax.methods.qcrs import search_draws  # noqa: E402
from rsjax.paths import SHARED_DATA  # noqa: E402

PAPER_N = 100_000


def method_config(name, argv):
    """The method's config dataclass from its command-line flags (rsjax.config)."""
    from rsjax import config

    method = get_method(name)
    p = argparse.ArgumentParser()
    config.add_arguments(p, method.config)
    return config.from_args(method.config, p.parse_args(argv))


def timed(fn, *a):
    t = time.perf_counter()
    out = fn(*a)
    jax.block_until_ready(jax.tree_util.tree_leaves(out))
    return out, time.perf_counter() - t


RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def table(paths, labels=None):
    """Markdown certified-accuracy table (r = 0..1.5 step 0.25, ACR, abstain rate, median
    sigma, seconds per image) of certify outputs of the same images."""
    from rsjax.analysis.results import load_results

    head = ["run", "imgs"] + [f"{r:g}" for r in RADII] + ["ACR", "abstain", "median sigma", "s/img", "guarantee"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, path in enumerate(paths):
        res = load_results(path)
        ok = res.correct.astype(bool)
        acc = [np.mean(ok & (res.radius >= r)) for r in RADII]
        sig = res.sigma if res.sigma is not None else np.full(res.n, float(res.settings.get("sigma", "nan")))
        g = res.extra.get("guarantee")
        g = sorted(set(g))[0] if isinstance(g, list) and g else "?"
        cells = [labels[i] if labels else res.label, str(res.n)] + [f"{a:.3f}" for a in acc] + [
            f"{np.mean(ok * res.radius):.3f}", f"{np.mean(res.predict == -1):.3f}", f"{np.median(sig):.3f}",
            f"{np.mean(res.time):.2f}", g]
        md.append("| " + " | ".join(cells) + " |")
    return "\n".join(md)


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "tables":
        print(table(sys.argv[2:]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(SHARED_DATA / "models/cifar10_resnet20_noise0.25/checkpoint.pth.tar"))
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--N", type=int, default=2000)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--qcrs", default="--epsilon 0.03 --left 0.08 --right 0.9 --epsilon_step 0.4 --gradient_n 500",
                   help="QCRS options (default: the QCRS README's CIFAR sigma=0.25 settings)")
    p.add_argument("--qcrs-budget", default=None,
                   help="also time the QCRS grid with this --qcrs-budget (row qcrs-budget; PCT%% is of N = 1e5)")
    p.add_argument("--methods", default=None,
                   help="comma-separated rows to run (ddrs, qcrs, qcrs-bisection, instars, qcrs-budget); default all")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/methods"))
    args = p.parse_args(argv)

    clf = load_model(args.model, log=lambda s: None)
    f, meta = clf
    ds = load_dataset(args.dataset, "test", None)
    m = args.images
    warm_idx, idx = np.arange(m) * 7 + 1, np.arange(m) * 7
    xw, _ = ds.batch(warm_idx)
    x, _ = ds.batch(idx)
    s0 = np.full(m, args.sigma)
    K = int(meta["num_classes"])
    sm = Smoother(f, K, args.batch)

    def certify(xx, ii, sig):
        return sm.certify(xx, sig, n0=100, n=args.N, alpha=0.001, key=0, idx=ii, group=m)

    certify(xw, warm_idx, s0)
    _, t_cert = timed(certify, x, idx, s0)
    rows = [{"method": "cohen", "search_s_per_image": 0.0, "certify_s_per_image": t_cert / m,
             "search_draws_per_image": 0, "overhead_time": 0.0, "overhead_draws_at_N=1e5": 0.0,
             "overhead_time_projected_N=1e5": 0.0}]

    qopts = args.qcrs.split()
    configs = {
        "ddrs": ["--ddrs-sigma0", str(args.sigma)],
        "qcrs": qopts,
        "qcrs-bisection": qopts + ["--qcrs-search", "bisection"],
        "instars": ["--instars-train-sigmas", str(args.sigma)],
    }
    if args.qcrs_budget:
        configs["qcrs-budget"] = qopts + ["--qcrs-budget", args.qcrs_budget]
    if args.methods:
        wanted = [w.strip() for w in args.methods.split(",") if w.strip()]
        unknown = sorted(set(wanted) - set(configs) - {"cohen"})
        if unknown:
            p.error(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(configs)})")
        configs = {k: v for k, v in configs.items() if k in wanted}
    qcrs_runs = {}
    for label, opts in configs.items():
        name = label.split("-")[0]
        cfg = method_config(name, opts)
        # a --qcrs-budget percentage is of the N the overhead is projected to
        chooser = get_method(name).build(cfg, clf, seed=0, batch_size=args.batch, n=PAPER_N)
        chooser(xw, warm_idx, s0)  # compile
        (sigma, _), t = timed(chooser, x, idx, s0)
        _, tc = timed(certify, x, idx, np.asarray(sigma))
        if name == "ddrs":
            draws = cfg.ddrs_steps * cfg.ddrs_n  # forward+backward passes per image
        elif name == "qcrs":
            q = chooser.qcrs
            draws = search_draws(q.cfg)["total"]
            key = q.cfg.search if q.cfg.budget is None else f"{q.cfg.search}, budget {q.cfg.budget}"
            qcrs_runs[key] = {"sequential_sampler_calls": search_draws(q.cfg)["sequential_calls"],
                                       "search_rounds": search_draws(q.cfg)["search_rounds"],
                                       "draws_per_image": draws, "seconds_per_image": t / m,
                                       "median_sigma": float(np.median(sigma))}
        else:
            draws = draws_per_image(len(start_set(args.sigma, chooser.insta.cfg)), chooser.insta.cfg)
        rows.append({"method": label, "search_s_per_image": t / m, "certify_s_per_image": tc / m,
                     "search_draws_per_image": draws,
                     "overhead_draws_at_N=1e5": draws / (PAPER_N + 100),
                     "median_sigma": float(np.median(sigma))})
        print(label, f"search {t / m:.3f} s/img, certify {tc / m:.3f} s/img", flush=True)

    # CERTIFY does the same work for every method (n0 + N draws per image): its timings differ
    # only by machine noise, so the overheads use their mean as the common denominator
    cert = float(np.mean([r["certify_s_per_image"] for r in rows]))
    for r in rows:
        r["overhead_time"] = r["search_s_per_image"] / cert
        r["overhead_time_projected_N=1e5"] = r["search_s_per_image"] / (cert * (PAPER_N + 100) / (args.N + 100))
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
                   f"jax {jax.__version__} on {jax.devices()[0].platform}; shared with other jobs "
                   f"(load average {os.getloadavg()[0]:.1f} at the end)",
        "model": args.model, "arch": meta.get("arch"), "dataset": args.dataset, "sigma": args.sigma,
        "images": [int(i) for i in idx], "N0": 100, "N": args.N, "batch": args.batch,
        "qcrs_options": args.qcrs, "qcrs_budget": args.qcrs_budget, "methods": rows, "qcrs_search": qcrs_runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = [f"# Input-specific sigma methods: cost vs Cohen CERTIFY\n",
          f"{result['machine']}. Model {meta.get('arch')} ({args.model}), sigma0 {args.sigma}, "
          f"{m} {args.dataset} test images {result['images']}, CERTIFY n0 = 100, N = {args.N}, batch {args.batch}. "
          f"Warm timings (compilation excluded).\n",
          "| method | search s/img | CERTIFY s/img (N=%d) | search / mean CERTIFY time | search time / CERTIFY time projected to N=1e5 | search draws/img | draws overhead at N=1e5 | median sigma |" % args.N,
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['method']} | {r['search_s_per_image']:.3f} | {r['certify_s_per_image']:.3f} | "
                  f"{100 * r['overhead_time']:.1f}% | {100 * r['overhead_time_projected_N=1e5']:.2f}% | "
                  f"{r['search_draws_per_image']} | "
                  f"{100 * r['overhead_draws_at_N=1e5']:.2f}% | {r.get('median_sigma', args.sigma):.3f} |")
    budget = f", row qcrs-budget: --qcrs-budget {args.qcrs_budget} (of N = 1e5)" if args.qcrs_budget else ""
    md += ["", f"QCRS search ({args.qcrs}{budget}), same sampler, same images:", "",
           "| search | sequential sampler calls | search rounds | draws/img | s/img |", "|---|---|---|---|---|"]
    for k, v in qcrs_runs.items():
        md.append(f"| {k} | {v['sequential_sampler_calls']} | {v['search_rounds']} | {v['draws_per_image']} | "
                  f"{v['seconds_per_image']:.3f} |")
    md.append("\nDDRS draws = forward+backward passes per image (K x n). The projection to N = 1e5 scales "
              "the measured CERTIFY time by (1e5 + 100) / (N + 100) (CERTIFY is linear in its draws); "
              "the denominator is the mean of the CERTIFY timings of all rows (the same work each).")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
