"""``rsjax certify`` and ``rsjax predict``: drop-ins for Cohen et al.'s certify.py / predict.py.

    rsjax certify DATASET CHECKPOINT SIGMA OUTFILE [--N0 100] [--N 100000] [--alpha 0.001]
                  [--batch auto] [--skip 1] [--max -1] [--split test] [--seed 0]
                  [--data-dir DIR] [--overwrite] [--dtype float32] [--method cohen|...]
    rsjax predict DATASET CHECKPOINT SIGMA OUTFILE [--N 100000] [--alpha 0.001] [...]

CHECKPOINT is a converted model directory (``rsjax convert``) or a PyTorch checkpoint
(``.pth``/``.pth.tar``/``.pt``), converted on the fly into a temporary directory.
The images are the dataset indices i with ``i % skip == 0`` and ``i < max`` (``--max -1``: all).
Each image's noise derives from (``--seed``, its index), so the rows do not depend on
``--batch``, ``--skip`` or a resume. OUTFILE gets ``# key=value`` settings lines, Cohen's
header and one flushed row per image; running the same command again resumes after the last
complete row (``--max`` and ``--batch`` may change between runs, the settings may not).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rsjax.errors import CheckpointError, RsjaxError, check_alpha, check_count, check_positive

SUMMARY_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
PYTORCH_SUFFIXES = (".pth", ".tar", ".pt", ".ckpt")


def add_parser(parser, name):
    certify = name == "certify"
    parser.add_argument("dataset", help="mnist, cifar10 or imagenet")
    parser.add_argument("checkpoint", help="converted model directory, or a PyTorch checkpoint (.pth/.pth.tar) converted on the fly")
    parser.add_argument("sigma", type=float, help="noise level sigma (pixel units of [0, 1] images)")
    parser.add_argument("outfile", help="output TSV (resumed if it exists with the same settings)")
    if certify:
        parser.add_argument("--N0", type=int, default=100, help="selection draws n0 (default 100)")
    parser.add_argument("--N", type=int, default=100_000, help="estimation draws n (default 100000)")
    parser.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    parser.add_argument("--batch", default="auto",
                        help="forward batch size on the device, or 'auto' (default): per model and device, "
                             "see rsjax.core.batching")
    parser.add_argument("--skip", type=int, default=1, help="use every skip-th dataset index (default 1)")
    parser.add_argument("--max", type=int, default=-1, help="stop before this dataset index (default -1: all)")
    parser.add_argument("--split", default="test", help="test or train (default test)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-image noise streams (default 0)")
    parser.add_argument("--data-dir", default=None,
                        help="directory with the standard dataset files (default: tensorflow-datasets, "
                             "then ../shared/data/<dataset>)")
    parser.add_argument("--dtype", default="float32", help="network compute dtype: float32 or bfloat16")
    parser.add_argument("--overwrite", action="store_true", help="start OUTFILE over instead of resuming it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    dist = parser.add_argument_group("several hosts (jax.distributed)")
    dist.add_argument("--distributed", action="store_true",
                      help="start jax.distributed; this process certifies its share of the images and writes "
                           "OUTFILE.part<k>of<n> (join the parts with `rsjax merge`)")
    dist.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (not needed on managed clusters)")
    dist.add_argument("--num-processes", type=int, default=None, help="number of processes")
    dist.add_argument("--process-id", type=int, default=None, help="this process's index")
    method_dests = {}
    if certify:
        from rsjax.methods import all_methods

        methods = all_methods()
        parser.add_argument("--method", default="cohen", choices=sorted(methods),
                            help="how sigma is chosen per input (default cohen: the global SIGMA)")
        for m in methods.values():
            before = {a.dest for a in parser._actions}
            m.add_arguments(parser)
            method_dests[m.name] = [a.dest for a in parser._actions if a.dest not in before]
    parser.set_defaults(func=run, _command=name, _method_dests=method_dests)


# ------------------------------------------------------------------------------------ helpers

def load_model(checkpoint, dtype="float32", log=None):
    """(f, meta) from a converted model directory, or from a PyTorch checkpoint converted on the fly."""
    from rsjax.classifier import load_classifier

    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"{checkpoint}: no such model directory or checkpoint file")
    if path.is_dir():
        return load_classifier(path, dtype=dtype)
    if not str(path).endswith(PYTORCH_SUFFIXES):
        raise CheckpointError(f"{checkpoint}: neither a converted model directory nor a PyTorch checkpoint "
                              f"({', '.join(PYTORCH_SUFFIXES)})")
    from converters.pytorch import convert_checkpoint

    with tempfile.TemporaryDirectory(prefix="rsjax-convert-") as tmp:
        convert_checkpoint(path, Path(tmp) / "model", log=log or (lambda s: print(f"convert: {s}", file=sys.stderr)))
        f, meta = load_classifier(Path(tmp) / "model", dtype=dtype)
        # the variables are in memory now; the temporary directory can go
        return f, meta


def select_indices(n_items, skip, max_idx):
    """Cohen's loop: dataset indices i with i % skip == 0 and (max < 0 or i < max)."""
    stop = n_items if max_idx < 0 else min(n_items, max_idx)
    return np.arange(0, stop, skip, dtype=np.int64)


def summarize(correct, radius, predict, seconds, radii=SUMMARY_RADII):
    """Certified accuracy at ``radii`` (mean of [correct and radius >= r]), ACR (mean of
    correct * radius), abstain rate and seconds per image, as a dict."""
    correct = np.asarray(correct, bool)
    n = len(correct)
    out = {"images": n}
    if n == 0:
        return out
    if radius is not None:
        radius = np.asarray(radius, float)
        for r in radii:
            out[f"r={r:g}"] = float(np.mean(correct & (radius >= r)))
        out["ACR"] = float(np.mean(correct * radius))
    else:
        out["accuracy"] = float(np.mean(correct))
    out["abstain"] = float(np.mean(np.asarray(predict) == -1))
    out["s/image"] = float(np.mean(seconds))
    return out


def format_summary(s):
    if s["images"] == 0:
        return "no images certified"
    parts = [f"{s['images']} images"]
    parts += [f"certified accuracy {k}: {v:.3f}" for k, v in s.items() if k.startswith("r=")]
    for k in ("accuracy", "ACR", "abstain"):
        if k in s:
            parts.append(f"{k}: {s[k]:.3f}" if k != "abstain" else f"abstain rate: {s[k]:.3f}")
    parts.append(f"seconds per image: {s['s/image']:.3f}")
    return "\n".join(parts)


def _settings(args, method, meta):
    s = {
        "rsjax": args._command,
        "dataset": args.dataset,
        "split": args.split,
        "checkpoint": args.checkpoint,
        "arch": meta.get("arch"),
        "sigma": float(args.sigma),
    }
    if args._command == "certify":
        s["N0"] = args.N0
    s.update({"N": args.N, "alpha": float(args.alpha), "skip": args.skip, "seed": args.seed, "dtype": args.dtype})
    if args._command == "certify":
        s["method"] = method.name
        for dest in args._method_dests.get(method.name, []):
            s[dest] = getattr(args, dest)
    return s


def resolve_batch(args, f, meta):
    """``args.batch`` as an integer: ``auto`` becomes :func:`rsjax.core.batching.auto_batch_size`."""
    if args.batch != "auto":
        return args.batch
    from rsjax.core.batching import auto_batch_size

    batch, info = auto_batch_size(f, tuple(int(v) for v in meta["input_shape"]))
    per = ""
    if "bytes_per_sample" in info:
        b = info["bytes_per_sample"]
        per = f", {b / 2**20:.1f} MiB per input" if b >= 2**20 else f", {b / 2**10:.0f} KiB per input"
    print(f"rsjax {args._command}: --batch auto -> {batch} ({info['platform']}{per})", file=sys.stderr)
    return batch


def _validate(args):
    check_positive("sigma", args.sigma)
    check_alpha(args.alpha)
    if args._command == "certify":
        check_count("N0", args.N0)
    check_count("N", args.N)
    from rsjax.core.batching import parse_batch

    try:
        args.batch = parse_batch(args.batch)
    except ValueError as e:
        raise RsjaxError(str(e)) from None
    check_count("--skip", args.skip)
    if args.max != -1:
        check_count("--max", args.max, minimum=0)


# ------------------------------------------------------------------------------------ run

def run(args):
    from rsjax.data import load_dataset

    _validate(args)
    process = (0, 1)
    if args.distributed:  # before anything touches the XLA backend
        from rsjax.parallel import initialize

        process = initialize(args.coordinator, args.num_processes, args.process_id)
    certify = args._command == "certify"
    method = None
    if certify:
        from rsjax.methods import get_method

        method = get_method(args.method)
    ds = load_dataset(args.dataset, args.split, args.data_dir)
    f, meta = load_model(args.checkpoint, args.dtype)
    model_shape = tuple(int(v) for v in meta["input_shape"])
    if tuple(ds.input_shape) != model_shape:
        raise RsjaxError(f"{args.dataset} images have shape {tuple(ds.input_shape)} (H, W, C) but the model "
                         f"({meta.get('arch')}, {meta.get('dataset')}) expects {model_shape}")
    if int(meta["num_classes"]) != ds.num_classes:
        raise RsjaxError(f"{args.dataset} has {ds.num_classes} classes but the model has {meta['num_classes']} outputs")

    from rsjax.core.certify import Smoother
    from rsjax.core.io import CERTIFY_COLUMNS, PREDICT_COLUMNS, ResultWriter

    extra_cols = ()
    chooser = memory = None
    if certify:
        extra_cols = tuple(method.extra_columns)
        columns = CERTIFY_COLUMNS + ("sigma", "pA_lower", "guarantee", "dtype") + extra_cols
    else:
        columns = PREDICT_COLUMNS
    indices = select_indices(len(ds), args.skip, args.max)
    outfile = args.outfile
    if args.distributed:
        from rsjax.parallel import host_share, part_path

        indices, outfile = host_share(indices, *process), part_path(args.outfile, *process)
    writer = ResultWriter(outfile, columns, _settings(args, method, meta), overwrite=args.overwrite)
    try:
        if writer.resumed:
            todo = indices[indices > writer.last_idx] if writer.last_idx is not None else indices
            print(f"rsjax {args._command}: resuming {outfile}: {len(writer.rows)} rows kept, "
                  f"{len(todo)} images to go", file=sys.stderr)
        else:
            todo = indices
        args.batch = resolve_batch(args, f, meta)
        if certify and method.build is not None:
            chooser = method.build(args, f, meta)
        if certify and method.memory is not None:
            memory = method.memory(args, outfile)

        smoother = Smoother(f, int(meta["num_classes"]), args.batch)
        nums = (args.N0, args.N) if certify else (args.N,)
        group = max(smoother.layout(max(len(todo), 1), num)[0] for num in nums)
        _loop(args, ds, todo, group, smoother, writer, chooser, memory, method, extra_cols)
    finally:
        writer.close()

    s = _summary_of(writer, certify)
    print(f"rsjax {args._command}: {outfile}")
    print(format_summary(s))
    if memory is not None:
        print(f"memory changed {memory.changed} certificates")
    return 0


def _loop(args, ds, todo, group, smoother, writer, chooser, memory, method, extra_cols):
    from tqdm import tqdm

    certify = args._command == "certify"
    # the memory check turns a per-input certificate into a memory one (section 4.3)
    guarantee = ("memory" if memory is not None else method.guarantee) if certify else None
    done_correct = [int(c) for c in writer.column("correct")]
    done_radius = [float(r) for r in writer.column("radius")] if certify else None
    bar = tqdm(total=len(todo), unit="img", desc=args._command, disable=args.no_progress or len(todo) == 0,
               file=sys.stderr, dynamic_ncols=True)
    with bar:
        for start in range(0, len(todo), group):
            idx = todo[start:start + group]
            t0 = time.perf_counter()
            x, labels = ds.batch(idx)
            sigma = np.full(len(idx), float(args.sigma))
            extras = {}
            if certify:
                if chooser is not None:
                    sigma, extras = chooser(x, idx, sigma)
                    sigma = np.asarray(sigma, np.float64)
                pred, radius, pA = smoother.certify(x, sigma, n0=args.N0, n=args.N, alpha=args.alpha,
                                                    key=args.seed, idx=idx, group=group)
                if memory is not None:
                    # saved before the rows are written: a crash in between recomputes these
                    # images on resume, and the memory recognises them by index
                    pred, radius = memory.update(x, pred, radius, idx=idx)
                    memory.save()
                extras = {"pABar": pA, **extras}  # QCRS's name for the final pA_lower
            else:
                pred, _ = smoother.predict(x, sigma, n=args.N, alpha=args.alpha, key=args.seed, idx=idx, group=group)
            seconds = (time.perf_counter() - t0) / len(idx)
            for i in range(len(idx)):
                correct = int(pred[i] == labels[i])
                if certify:
                    row = [int(idx[i]), int(labels[i]), int(pred[i]), float(radius[i]), correct, seconds,
                           float(sigma[i]), float(pA[i]), guarantee, args.dtype]
                    row += [np.asarray(extras[c])[i] for c in extra_cols]
                    done_radius.append(float(radius[i]))
                else:
                    row = [int(idx[i]), int(labels[i]), int(pred[i]), correct, seconds]
                writer.write(row)
                done_correct.append(correct)
            post = {"acc": f"{np.mean(done_correct):.3f}"}
            if certify:
                post["ACR"] = f"{np.mean(np.asarray(done_correct) * np.asarray(done_radius)):.3f}"
            bar.set_postfix(post, refresh=False)  # shown by the update below, with this group counted
            bar.update(len(idx))


def _summary_of(writer, certify):
    correct = [int(c) for c in writer.column("correct")]
    radius = [float(r) for r in writer.column("radius")] if certify else None
    predict = [int(p) for p in writer.column("predict")]
    seconds = [float(t) for t in writer.column("time")]
    return summarize(correct, radius, predict, seconds)
