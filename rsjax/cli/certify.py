"""``rsjax certify`` and ``rsjax predict``: drop-ins for Cohen et al.'s certify.py / predict.py.

    rsjax certify DATASET CHECKPOINT SIGMA OUTFILE [--N0 100] [--N 100000] [--alpha 0.001]
                  [--batch auto] [--skip 1] [--start 0] [--max -1] [--split test] [--seed 0]
                  [--data-dir DIR] [--overwrite] [--dtype float32] [--method cohen|...]
                  [--certifier cohen]
    rsjax predict DATASET CHECKPOINT SIGMA OUTFILE [--N 100000] [--alpha 0.001] [...]

CHECKPOINT is a converted model directory (``rsjax convert``) or a PyTorch checkpoint
(``.pth``/``.pth.tar``/``.pt``), converted on the fly (weights-only loading; see
``--trust-checkpoint``). The images are the dataset indices i with ``i % skip == 0`` and
``i < max`` (``--max -1``: all), or with ``--start S`` the indices S, S + skip, ... below max. Each image's noise derives from (``--seed``, its index), so the
rows do not depend on ``--batch``, ``--skip`` or a resume.

OUTFILE is a TSV whose first line is the header (Cohen's columns first) with one row per image,
and ``OUTFILE.json`` holds the settings (:mod:`rsjax.core.io`). Running the same command again
resumes after the last complete row (``--start``, ``--max`` and ``--batch`` may change between runs, the
settings may not; the model is identified by its checksum). Every argument is checked before
OUTFILE is created; one process writes OUTFILE at a time.

Both commands run one group loop (:func:`group_loop`): images in groups that fill the device
batch, one row per image. :func:`certify_step` and :func:`predict_step` say what a group
computes; a method (``--method``) chooses sigma per image and a certifier (``--certifier``)
computes the certificate, each declaring its own extra columns.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rsjax import config
from rsjax.cli import check_interrupt
from rsjax.errors import CheckpointError, RsjaxError, check_alpha, check_count

SUMMARY_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
PYTORCH_SUFFIXES = (".pth", ".tar", ".pt", ".ckpt")
DTYPES = ("float32", "bfloat16")
SEED_LIMIT = 2**32  # jax.random.key wraps seeds modulo 2**32
# rsjax's columns after Cohen's: the noise level used, the final bound, what the row
# certifies, the compute dtype, the draws that gave no vote (non-finite logits)
CERTIFY_EXTRAS = ("sigma", "pA_lower", "guarantee", "dtype", "nonfinite")
PREDICT_EXTRAS = ("nonfinite",)
LEGACY_MISSING = ("nonfinite",)  # columns rsjax's earlier files lack (empty in their migrated rows)
BAR_MININTERVAL = 0.5  # seconds between progress bar redraws


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
    parser.add_argument("--start", type=int, default=0,
                        help="first dataset index: the images are start, start+skip, ... (default 0, Cohen's loop)")
    parser.add_argument("--split", default="test", help="test or train (default test)")
    parser.add_argument("--seed", type=int, default=0, help=f"seed of the per-image noise streams, 0..{SEED_LIMIT - 1} "
                                                              "(default 0)")
    parser.add_argument("--data-dir", default=None,
                        help="directory with the dataset (tensorflow-datasets or the standard files); default: "
                             "tensorflow-datasets, then $RSJAX_DATA_DIR")
    parser.add_argument("--dtype", default="float32", help="network compute dtype: float32 or bfloat16")
    parser.add_argument("--cpu-kernels", default="xla", choices=("auto", "onednn", "xla"),
                        help="CPU convolutions: XLA's (default), oneDNN's with fused bias/ReLU/residual "
                             "(rsjax.kernels.onednn), or auto (oneDNN where it is built and the backend is CPU)")
    parser.add_argument("--overwrite", action="store_true", help="start OUTFILE over instead of resuming it")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load a PyTorch CHECKPOINT that the weights-only loader refuses with full unpickling: "
                             "this runs arbitrary code from the file; only for files you trust")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    dist = parser.add_argument_group("several hosts (jax.distributed)")
    dist.add_argument("--distributed", action="store_true",
                      help="start jax.distributed; this process certifies its share of the images and writes "
                           "OUTFILE.part<k>of<n> (join the parts with `rsjax merge`)")
    dist.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (not needed on managed clusters)")
    dist.add_argument("--num-processes", type=int, default=None, help="number of processes")
    dist.add_argument("--process-id", type=int, default=None, help="this process's index")
    if certify:
        from rsjax.certifiers import all_certifiers
        from rsjax.methods import all_methods

        methods, certifiers = all_methods(), all_certifiers()
        parser.add_argument("--method", default="cohen", choices=sorted(methods),
                            help="how sigma is chosen per input (default cohen: the global SIGMA)")
        parser.add_argument("--certifier", default="cohen", choices=sorted(certifiers),
                            help="how the certificate is computed at the chosen sigma (default cohen: CERTIFY)")
        for m in methods.values():
            config.add_arguments(parser, m.config, title=f"--method {m.name} options")
        for c in certifiers.values():
            config.add_arguments(parser, c.config, title=f"--certifier {c.name} options")
    parser.set_defaults(func=run_certify if certify else run_predict, _command=name)


# ------------------------------------------------------------------------------------ checks

def check_sigma(sigma):
    if not (math.isfinite(sigma) and sigma > 0):
        raise RsjaxError(f"sigma must be a finite number > 0, got {sigma}")
    return float(sigma)


def validate(args):
    """Every command-line value that can be checked without the data or the model; raises
    RsjaxError before anything is written."""
    from rsjax.core.batching import parse_batch
    from rsjax.data import DATASET_INFO, SPLITS

    check_sigma(args.sigma)
    check_alpha(args.alpha)
    if args._command == "certify":
        check_count("N0", args.N0)
    check_count("N", args.N)
    try:
        args.batch = parse_batch(args.batch)
    except ValueError as e:
        raise RsjaxError(str(e)) from None
    check_count("--skip", args.skip)
    if args.max != -1:
        check_count("--max", args.max, minimum=0)
    check_count("--start", args.start, minimum=0)
    if not 0 <= args.seed < SEED_LIMIT:
        raise RsjaxError(f"--seed must be in 0..{SEED_LIMIT - 1}, got {args.seed}")
    if args.dtype not in DTYPES:
        raise RsjaxError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    if args.dataset not in DATASET_INFO:
        raise RsjaxError(f"unknown dataset {args.dataset!r}; choose from {', '.join(DATASET_INFO)}")
    if args.split not in SPLITS:
        raise RsjaxError(f"unknown split {args.split!r}; choose from {', '.join(SPLITS)}")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise RsjaxError(f"--data-dir {args.data_dir} is not a directory")
    if not Path(args.checkpoint).exists():
        raise CheckpointError(f"{args.checkpoint}: no such model directory or checkpoint file")
    out = Path(args.outfile)
    if out.is_dir():
        raise RsjaxError(f"{out}: is a directory; OUTFILE must be a file")
    if not out.parent.is_dir():
        raise RsjaxError(f"{out.parent}: no such directory for the output file")
    if args.num_processes is not None and args.num_processes < 1:
        raise RsjaxError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.process_id is not None and (args.process_id < 0 or (args.num_processes is not None
                                                                and args.process_id >= args.num_processes)):
        raise RsjaxError(f"--process-id must be in 0..{(args.num_processes or 1) - 1}, got {args.process_id}")


def plugin_config(kind, chosen, registry, args):
    """``chosen``'s config from the flags; RsjaxError for a flag of another plug-in of ``registry``."""
    for other in registry.values():
        if other.name != chosen.name:
            given = config.given_flags(other.config, args)
            if given:
                raise RsjaxError(f"{', '.join(given)} belong{'s' if len(given) == 1 else ''} to --{kind} {other.name}, "
                                 f"not --{kind} {chosen.name}")
    return config.from_args(chosen.config, args)


# ------------------------------------------------------------------------------------ model

def load_model(checkpoint, dtype="float32", *, trust=False, log=None, cpu_kernels="xla"):
    """The :class:`rsjax.classifier.Classifier` of a converted model directory, or of a PyTorch
    checkpoint converted on the fly (``trust``: see :func:`converters.pytorch.read_checkpoint`),
    BN-folded, width-packed where :func:`rsjax.xla.pack_narrow_convs` says that is faster, with
    its convolutions in oneDNN or XLA as ``cpu_kernels`` says."""
    from functools import partial

    from rsjax.classifier import load_classifier as load
    from rsjax.xla import pack_narrow_convs

    load_classifier = partial(load, pack_narrow=pack_narrow_convs(folded=True), cpu_kernels=cpu_kernels)

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
        convert_checkpoint(path, Path(tmp) / "model", trust=trust,
                           log=log or (lambda s: print(f"convert: {s}", file=sys.stderr)))
        # the variables are in memory once loaded; the temporary directory can go
        return load_classifier(Path(tmp) / "model", dtype=dtype)


def resolve_batch(args, clf):
    """``args.batch`` as an integer: ``auto`` becomes :func:`rsjax.core.batching.auto_batch_size`."""
    if args.batch != "auto":
        return args.batch
    from rsjax.core.batching import auto_batch_size

    batch, info = auto_batch_size(clf.f, tuple(int(v) for v in clf.meta["input_shape"]))
    per = ""
    if "bytes_per_sample" in info:
        b = info["bytes_per_sample"]
        per = f", {b / 2**20:.1f} MiB per input" if b >= 2**20 else f", {b / 2**10:.0f} KiB per input"
    print(f"rsjax {args._command}: --batch auto -> {batch} ({info['platform']}{per})", file=sys.stderr)
    return batch


def select_indices(n_items, skip, max_idx, start=0):
    """Cohen's loop: dataset indices start, start + skip, ... below max (max < 0: all); with
    start 0 these are the i with i % skip == 0."""
    stop = n_items if max_idx < 0 else min(n_items, max_idx)
    return np.arange(start, stop, skip, dtype=np.int64)


# ------------------------------------------------------------------------------------ a run

class Run:
    """What both commands share: the validated arguments, the data, the model, the images to do
    and the output file; built in this order so that nothing is written before every check."""

    def __init__(self, args, columns, settings, legacy_optional=()):
        from rsjax.data import load_dataset

        self.args = args
        process = (0, 1)
        if args.distributed:  # before anything touches the XLA backend
            from rsjax.distributed import initialize

            process = initialize(args.coordinator, args.num_processes, args.process_id)
        self.ds = load_dataset(args.dataset, args.split, args.data_dir)
        check_interrupt()
        self.clf = load_model(args.checkpoint, args.dtype, trust=args.trust_checkpoint, cpu_kernels=args.cpu_kernels)
        check_interrupt()
        meta = self.clf.meta
        self.input_shape = tuple(int(v) for v in meta["input_shape"])
        if tuple(self.ds.input_shape) != self.input_shape:
            raise RsjaxError(f"{args.dataset} images have shape {tuple(self.ds.input_shape)} (H, W, C) but the model "
                             f"({meta.get('arch')}, {meta.get('dataset')}) expects {self.input_shape}")
        if int(meta["num_classes"]) != self.ds.num_classes:
            raise RsjaxError(f"{args.dataset} has {self.ds.num_classes} classes but the model has "
                             f"{meta['num_classes']} outputs")
        if args.start >= len(self.ds):
            raise RsjaxError(f"--start {args.start}: the {args.split} split holds {len(self.ds)} images")
        indices = select_indices(len(self.ds), args.skip, args.max, args.start)
        self.outfile = args.outfile
        if args.distributed:
            from rsjax.distributed import host_share, part_path

            indices, self.outfile = host_share(indices, *process), part_path(args.outfile, *process)
        self.columns = tuple(columns)
        self.settings = {"rsjax": args._command, "dataset": args.dataset, "split": args.split,
                         "model_sha256": self.clf.checksum, "arch": meta.get("arch"), **settings,
                         "cpu_kernels": meta.get("cpu_kernels", "xla")}
        info = {"checkpoint": args.checkpoint, "checkpoint_resolved": str(Path(args.checkpoint).resolve())}
        if args.distributed:
            info["part"] = f"{process[0]}of{process[1]}"
        from rsjax.core.io import ResultWriter

        self.writer = ResultWriter(self.outfile, self.columns, self.settings, info=info,
                                   legacy_settings=self._legacy_settings(settings), overwrite=args.overwrite,
                                   legacy_same={"checkpoint": _same_path}, legacy_missing=LEGACY_MISSING,
                                   legacy_optional=legacy_optional)
        self.todo = indices
        if self.writer.resumed:
            if self.writer.last_idx is not None:
                self.todo = indices[indices > self.writer.last_idx]
            how = " (settings moved to " + self.writer.sidecar.name + ")" if self.writer.migrated else ""
            print(f"rsjax {args._command}: resuming {self.outfile}{how}: {len(self.writer.rows)} rows kept, "
                  f"{len(self.todo)} images to go", file=sys.stderr)

    def _legacy_settings(self, settings):
        """The ``# key=value`` lines an earlier rsjax wrote for this run (compared when resuming its files)."""
        a = self.args
        s = {"rsjax": a._command, "dataset": a.dataset, "split": a.split, "checkpoint": a.checkpoint,
             "arch": self.clf.meta.get("arch"), "sigma": float(a.sigma)}
        if a._command == "certify":
            s["N0"] = a.N0
        s.update({"N": a.N, "alpha": float(a.alpha), "skip": a.skip, "seed": a.seed, "dtype": a.dtype})
        if a._command == "certify":
            method = settings["method"]
            s["method"] = method["name"]
            s.update({k: v for k, v in method.items() if k != "name"})
        return s

    def close(self):
        self.writer.close()


def _same_path(a, b):
    return Path(a).resolve() == Path(b).resolve()


class Progress:
    """A tqdm bar over images that moves per device step: ``samples(k)`` advances it by k noisy
    forward samples (``draws_per_image`` of them make one image); ``group_done`` sets the exact
    count and the accuracy so far after each group."""

    def __init__(self, total, draws_per_image, desc, disable):
        from tqdm import tqdm

        self.draws = float(draws_per_image)
        self.bar = tqdm(total=total, unit="img", desc=desc, disable=disable or total == 0, file=sys.stderr,
                        dynamic_ncols=True, mininterval=BAR_MININTERVAL,
                        bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} img [{elapsed}<{remaining}{postfix}]")
        self.done = 0

    def samples(self, k):
        check_interrupt()
        # never past the group's end: a method's own draws are not counted, so this is a lower bound
        self.bar.update(max(0.0, min(k / self.draws, self.bar.total - self.bar.n)))

    def group_done(self, count, postfix):
        self.done += count
        self.bar.n = self.done
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def close(self):
        self.bar.close()


def group_size(num_images, nums, batch):
    """Images per group: as many as fill one forward batch for each draw count in ``nums``
    (:func:`rsjax.core.sampler.choose_layout`); the rows never depend on it."""
    from rsjax.core.sampler import choose_layout

    return max(choose_layout(max(num_images, 1), num, batch)[0] for num in nums)


def group_loop(run, group, step, progress):
    """For each group of ``group`` images of ``run.todo``: load and check them, ``step(x, idx,
    labels, progress) -> list of row dicts`` (every column but ``time``), write the rows.
    Yields each group's rows after they are written."""
    from rsjax.core.certify import check_images

    todo = run.todo
    for start in range(0, len(todo), group):
        check_interrupt()
        idx = todo[start:start + group]
        t0 = time.perf_counter()
        x, labels = run.ds.batch(idx)
        check_images(x, input_shape=run.input_shape, idx=idx)
        rows = step(x, idx, labels, progress.samples)
        seconds = (time.perf_counter() - t0) / len(idx)
        for row in rows:
            row["time"] = seconds
            run.writer.write(row)
        yield rows


def drive(run, group, step, draws_per_image):
    """:func:`group_loop` with the progress bar (accuracy so far over the file's rows, ACR when
    there is a radius) and the non-finite warning."""
    command = run.args._command
    certify = "radius" in run.columns
    correct = [int(c) for c in run.writer.column("correct")]
    radius = [float(r) for r in run.writer.column("radius")] if certify else []
    progress = Progress(len(run.todo), draws_per_image, command, run.args.no_progress)
    try:
        for rows in group_loop(run, group, step, progress):
            _warn_nonfinite(command, rows)
            correct += [r["correct"] for r in rows]
            c = np.asarray(correct)
            if certify:
                radius += [r["radius"] for r in rows]
                postfix = {"certified acc": f"{np.mean(c):.3f}", "ACR": f"{np.mean(c * np.asarray(radius)):.3f}"}
            else:
                postfix = {"acc": f"{np.mean(c):.3f}"}
            progress.group_done(len(rows), postfix)
    finally:
        progress.close()


def _base_rows(idx, labels, pred):
    return [{"idx": int(idx[i]), "label": int(labels[i]), "predict": int(pred[i]),
             "correct": int(pred[i] == labels[i])} for i in range(len(idx))]


def _warn_nonfinite(command, rows):
    bad = [r for r in rows if int(r["nonfinite"]) > 0]
    if bad:
        print(f"rsjax {command}: warning: {len(bad)} image(s) (first idx {bad[0]['idx']}) had draws with non-finite "
              f"logits ({sum(int(r['nonfinite']) for r in bad)} draws in all); they gave no vote (column nonfinite)",
              file=sys.stderr)


def _column(values, i):
    v = np.asarray(values)[i]
    return v.item() if hasattr(v, "item") else v


# ------------------------------------------------------------------------------------ certify

def run_certify(args):
    from rsjax.certifiers import all_certifiers, get_certifier
    from rsjax.core.io import CERTIFY_COLUMNS
    from rsjax.methods import all_methods, get_method

    validate(args)
    method, certifier = get_method(args.method), get_certifier(args.certifier)
    method_cfg = plugin_config("method", method, all_methods(), args)
    certifier_cfg = plugin_config("certifier", certifier, all_certifiers(), args)
    columns = CERTIFY_COLUMNS + CERTIFY_EXTRAS + tuple(method.extra_columns) + tuple(certifier.columns)
    settings = {"sigma": float(args.sigma), "N0": args.N0, "N": args.N, "alpha": float(args.alpha),
                "skip": args.skip, "seed": args.seed, "dtype": args.dtype,
                "method": {"name": method.name, **config.to_dict(method_cfg)},
                "certifier": {"name": certifier.name, **config.to_dict(certifier_cfg)}}
    # an earlier file may lack options added since; at their default they change nothing
    defaults = config.to_dict(method.config())
    optional = [k for k, v in config.to_dict(method_cfg).items() if defaults.get(k) == v]
    run = Run(args, columns, settings, legacy_optional=optional)
    try:
        batch = resolve_batch(args, run.clf)
        check_interrupt()
        runner = certifier.build(certifier_cfg, run.clf, seed=args.seed, batch_size=batch)
        chooser = None if method.build is None else method.build(method_cfg, run.clf, seed=args.seed,
                                                                 batch_size=batch, n=args.N)
        memory = None if method.memory is None else method.memory(method_cfg, run.outfile)
        # the memory check turns a per-input certificate into a memory one (DDRS section 4.3)
        guarantee = "memory" if memory is not None else (
            method.guarantee if certifier.guarantee == "fixed" else certifier.guarantee)
        group = group_size(len(run.todo), (args.N0, args.N), batch)

        def step(x, idx, labels, samples):
            sigma = np.full(len(idx), float(args.sigma))
            extras = {}
            if chooser is not None:
                sigma, extras = chooser(x, idx, sigma)
                sigma = np.asarray(sigma, np.float64)
            cert = runner.certify(x, idx, sigma, n0=args.N0, n=args.N, alpha=args.alpha, progress=samples)
            if memory is not None:
                # saved before the rows are written: a crash in between recomputes these
                # images on resume, and the memory recognises them by index
                cert["predict"], cert["radius"] = memory.update(x, cert["predict"], cert["radius"], idx=idx)
                memory.save()
            if hasattr(chooser, "finish"):  # the method's columns that depend on the certificate
                extras = chooser.finish(extras, predict=cert["predict"], radius=cert["radius"],
                                        pA_lower=cert["pA_lower"])
            rows = _base_rows(idx, labels, cert["predict"])
            for i, row in enumerate(rows):
                row.update(radius=float(cert["radius"][i]), sigma=float(sigma[i]), pA_lower=float(cert["pA_lower"][i]),
                           guarantee=_column(cert["guarantee"], i) if "guarantee" in cert else guarantee,
                           dtype=args.dtype, nonfinite=int(cert["nonfinite"][i]))
                row.update({c: _column(extras[c], i) for c in method.extra_columns})
                row.update({c: _column(cert[c], i) for c in certifier.columns})
            return rows

        drive(run, group, step, args.N0 + args.N)
    finally:
        run.close()
    print_summary(run)
    if memory is not None:
        print(f"memory changed {memory.changed} certificates")
    return 0


# ------------------------------------------------------------------------------------ predict

def run_predict(args):
    from rsjax.certifiers import get_certifier
    from rsjax.core.io import PREDICT_COLUMNS

    validate(args)
    columns = PREDICT_COLUMNS + PREDICT_EXTRAS
    settings = {"sigma": float(args.sigma), "N": args.N, "alpha": float(args.alpha), "skip": args.skip,
                "seed": args.seed, "dtype": args.dtype}
    run = Run(args, columns, settings)
    try:
        batch = resolve_batch(args, run.clf)
        cohen = get_certifier("cohen")
        runner = cohen.build(cohen.config(), run.clf, seed=args.seed, batch_size=batch)
        group = group_size(len(run.todo), (args.N,), batch)

        def step(x, idx, labels, samples):
            out = runner.predict(x, idx, np.full(len(idx), float(args.sigma)), n=args.N, alpha=args.alpha,
                                 progress=samples)
            rows = _base_rows(idx, labels, out["predict"])
            for i, row in enumerate(rows):
                row["nonfinite"] = int(out["nonfinite"][i])
            return rows

        drive(run, group, step, args.N)
    finally:
        run.close()
    print_summary(run)
    return 0


# ------------------------------------------------------------------------------------ summary

def print_summary(run, radii=SUMMARY_RADII):
    """The output's name and :func:`format_summary` of it, on stdout."""
    print(f"rsjax {run.args._command}: {run.outfile}")
    print(format_summary(run.outfile, certify="radius" in run.columns, radii=radii))


def format_summary(path, *, certify, radii=SUMMARY_RADII):
    """Certified accuracy at ``radii``, ACR, abstain rate and seconds per image of the file
    ``path``, from :mod:`rsjax.analysis` (the numbers ``rsjax analyze`` prints)."""
    from rsjax.analysis import load_results, summarize
    from rsjax.core.io import read_table

    _, _, rows, _, _ = read_table(path)
    if not rows:
        return "no images certified" if certify else "no images predicted"
    s = summarize([load_results(path)], radii)
    lines = [f"{len(rows)} images"]
    if certify:
        lines += [f"certified accuracy r={r:g}: {a:.3f}" for r, a in zip(s.radii, s.accuracy[0])]
        lines.append(f"ACR: {s.acr[0]:.3f}")
    else:
        lines.append(f"accuracy: {s.clean[0]:.3f}")
    lines.append(f"abstain rate: {s.abstain[0]:.3f}")
    lines.append(f"seconds per image: {s.seconds[0]:.3f}")
    return "\n".join(lines)
