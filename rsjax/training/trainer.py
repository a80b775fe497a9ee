"""One ``rsjax train`` run: settings and presets, resume, checkpoints, logs and the model.

A run lives in ``OUTDIR``:

- ``settings.json``: the settings that determine the result (written before training starts);
  rerunning with the same settings resumes, with others is an error (``overwrite=True`` starts over);
- ``checkpoints/``: an orbax ``CheckpointManager`` step series of the whole :class:`TrainState`
  (parameters, batch statistics, optimiser state, per-example tables, the epoch's running metric
  sums, the step, which is also the input pipeline's position), saved at every epoch end and every
  ``checkpoint_every_steps`` steps, the last ``keep_checkpoints`` kept. Training noise and
  augmentation are functions of (seed, example, epoch), so there is no RNG state besides the seed;
  a run killed at any point and resumed ends with the same bits as an uninterrupted one;
- ``model/``: the rsjax classifier (:func:`rsjax.classifier.save_classifier`), rewritten at every
  epoch end; ``rsjax certify`` takes it as it is;
- ``log.txt``: Cohen's columns ``epoch time lr train loss train acc testloss test acc``
  (tab-separated; time as h:mm:ss.s; accuracies in percent; "test" is under one Gaussian draw at
  sigma, as Cohen's test loop); ``metrics.jsonl``: one JSON object per epoch with every metric
  (MACER's two loss terms, images/s, ...); ``curves.png``: the training curves;
- ``certify/epoch_<E>.tsv`` with ``certify_every``: CERTIFY on a fixed test subset with small N.

Rows of an epoch are written before its end-of-epoch checkpoint; a resumed run drops the rows of
epochs it recomputes, so each file has one row per epoch.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np

from rsjax.config import check, option, to_dict
from rsjax.errors import RsjaxError

SETTINGS_FILE = "settings.json"
OWNED = ("settings.json", "checkpoints", "model", "log.txt", "metrics.jsonl", "curves.png", "certify")
LOG_HEADER = "epoch\ttime\tlr\ttrain loss\ttrain acc\ttestloss\ttest acc"
# settings that may change between a run and its resumption: none changes the trained bits, except
# cpu_kernels, which changes them by float rounding only (the same step in other kernels)
RESUMABLE = ("epochs", "checkpoint_every_steps", "keep_checkpoints", "certify_every", "certify_n0", "certify_n",
             "certify_alpha", "certify_subset", "test_batch", "cpu_kernels")

MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "mnist": ((0.1307,), (0.3081,)),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of a run common to every objective (the objective's own are its config)."""

    method: str = option("gaussian", "training objective (gaussian, macer, ...)")
    sigma: float = option(0.25, "training noise level sigma")
    epochs: int = option(90, "epochs to train")
    batch: int = option(256, "global batch size (split over all devices and hosts)")
    lr: float = option(0.1, "initial learning rate")
    lr_schedule: str = option("step:30", "step:S | multistep:E1,E2 (0-based epochs) | constant | cosine")
    lr_gamma: float = option(0.1, "factor of each learning-rate step")
    momentum: float = option(0.9, "SGD momentum (PyTorch semantics)")
    weight_decay: float = option(1e-4, "L2 weight decay on every parameter (PyTorch SGD)")
    seed: int = option(0, "seed of the initialisation, the data order, the augmentation and the noise")
    split: str = option("train", "split to train on", choices=("train", "test"))
    subset: str = option(":", "START:STOP of the split's images to train on")
    normalization: str = option("auto", "input normalisation inside the model: auto (Cohen: dataset mean/std; "
                                "MACER and MNIST: none), meanstd, center, none",
                                choices=("auto", "meanstd", "center", "none"))
    init: Optional[str] = option(None, "initial weights: an rsjax model directory or a PyTorch checkpoint "
                                             "(none: drawn from --seed in the reference network's laws, "
                                             "rsjax.models.init)")
    test_split: str = option("auto", "split of the per-epoch test loss (auto: test when training on train, "
                             "none otherwise)", choices=("auto", "train", "test", "none"))
    test_subset: str = option(":", "START:STOP of the test split")
    test_batch: int = option(1000, "batch of the per-epoch test loop")
    checkpoint_every_steps: int = option(0, "also checkpoint every this many steps (0: epoch ends only)")
    keep_checkpoints: int = option(3, "checkpoints kept")
    certify_every: int = option(0, "certify the test subset every this many epochs (0: never)")
    certify_subset: str = option("0:100:1", "START:STOP:SKIP of the test split certified with --certify-every")
    certify_n0: int = option(100, "selection draws of --certify-every")
    certify_n: int = option(1000, "estimation draws of --certify-every")
    certify_alpha: float = option(0.001, "failure probability of --certify-every")
    cpu_kernels: str = option("auto", "convolutions of the train step on a CPU: onednn (the forward pass and both "
                              "gradients in oneDNN, docs/onednn.md; the same step up to float rounding), xla, or "
                              "auto (onednn where the extension loads and the backend is a CPU, else xla)",
                              choices=("auto", "onednn", "xla"))

    def __post_init__(self):
        from rsjax.training.step import parse_schedule

        check(self.sigma > 0 and math.isfinite(self.sigma), f"--sigma must be > 0, got {self.sigma}")
        check(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        check(self.batch >= 1, f"--batch must be >= 1, got {self.batch}")
        check(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        check(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        check(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        check(self.checkpoint_every_steps >= 0, "--checkpoint-every-steps must be >= 0")
        check(self.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1")
        check(self.certify_every >= 0, "--certify-every must be >= 0")
        check(self.certify_n0 >= 1 and self.certify_n >= 1, "--certify-n0 and --certify-n must be >= 1")
        check(0 < self.certify_alpha < 1, "--certify-alpha must be in (0, 1)")
        parse_schedule(self.lr_schedule)


# name -> (source, dataset, arch, TrainConfig fields, objective fields)
PRESETS = {
    "cohen-cifar10": ("locuslab/smoothing code/train.py defaults; batch 400 and 90 epochs as in its experiments.MD",
                      "cifar10", "cifar_resnet110",
                      dict(method="gaussian", epochs=90, batch=400, lr=0.1, lr_schedule="step:30", lr_gamma=0.1,
                           momentum=0.9, weight_decay=1e-4, normalization="meanstd"), {}),
    "cohen-imagenet": ("locuslab/smoothing code/train.py defaults (batch 256, all GPUs)", "imagenet", "resnet50",
                       dict(method="gaussian", epochs=90, batch=256, lr=0.1, lr_schedule="step:30", lr_gamma=0.1,
                            momentum=0.9, weight_decay=1e-4, normalization="meanstd"), {}),
    "macer-cifar10": ("RuntianZ/macer main.py defaults (MultiStepLR([200, 400]) stepped before each 1-based epoch)",
                      "cifar10", "cifar_resnet110",
                      dict(method="macer", epochs=440, batch=64, lr=0.01, lr_schedule="multistep:199,399",
                           lr_gamma=0.1, momentum=0.9, weight_decay=5e-4, normalization="none"),
                      dict(gauss_num=16, lbd=12.0, gamma=8.0, beta=16.0)),
    "macer-mnist": ("RuntianZ/macer main.py defaults with --dataset mnist (LeNet, no augmentation)", "mnist", "lenet",
                    dict(method="macer", epochs=440, batch=64, lr=0.01, lr_schedule="multistep:199,399",
                         lr_gamma=0.1, momentum=0.9, weight_decay=5e-4, normalization="none"),
                    dict(gauss_num=16, lbd=12.0, gamma=8.0, beta=16.0)),
}


def get_preset(name):
    if name not in PRESETS:
        raise RsjaxError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def resolve_normalization(cfg: TrainConfig, dataset: str):
    """(normalization, mean, std) of the model: ``auto`` is Cohen's dataset mean/std for Gaussian
    training on CIFAR-10/ImageNet, none for MNIST (the shared LeNet) and for MACER (no normaliser)."""
    norm = cfg.normalization
    if norm == "auto":
        norm = "none" if dataset == "mnist" or cfg.method != "gaussian" else "meanstd"
    mean, std = MEAN_STD[dataset]
    if norm == "none":
        return norm, tuple(0.0 for _ in mean), tuple(1.0 for _ in std)
    if norm == "center":
        return norm, mean, tuple(1.0 for _ in std)
    return norm, mean, std


# ----------------------------------------------------------------------------- the output directory


def run_settings(cfg: TrainConfig, objective_cfg, dataset: str, arch: str, data_hash: str, num_examples: int):
    return {"dataset": dataset, "arch": arch, **to_dict(cfg), "objective": to_dict(objective_cfg),
            "data_sha256": data_hash, "num_examples": num_examples}


def started_from(outdir: Path) -> str:
    """Where a resumed run's weights started, as its model metadata of an earlier epoch records it:
    ``rsjax.models.init``, ``--init``, or ``unknown`` when no earlier epoch's model records it (a run
    killed in its first epoch, or one started before 2026-12-03, when fresh weights were Flax's defaults)."""
    from rsjax.classifier import META_FILE

    try:
        return json.loads((Path(outdir) / "model" / META_FILE).read_text())["training"]["initialisation"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def with_defaults(old: dict, defaults: dict) -> dict:
    """``old`` settings with the options it does not record (added to rsjax after that run was
    written) at their ``defaults``, the values it ran with; nested dicts (``objective``) too."""
    out = dict(old)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = with_defaults(out[k], v)
    return out


def prepare_outdir(outdir: Path, settings: dict, *, overwrite: bool, defaults: dict | None = None) -> bool:
    """Check OUTDIR before anything is written. Returns True when an existing run resumes.

    Raises RsjaxError when OUTDIR holds files that are not a run's, or a run of other settings
    (``overwrite`` starts over, removing only what a run writes). ``defaults``: the settings of
    options at their defaults, which a run recorded before the option existed ran with."""
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise RsjaxError(f"{outdir}: exists and is not a directory")
    if not outdir.exists() or not any(outdir.iterdir()):
        return False
    sfile = outdir / SETTINGS_FILE
    if not sfile.is_file():
        raise RsjaxError(f"{outdir}: exists, is not empty and holds no rsjax train run ({SETTINGS_FILE}); "
                         "choose another OUTDIR")
    foreign = sorted(p.name for p in outdir.iterdir() if p.name not in OWNED)
    try:
        old = json.loads(sfile.read_text())
    except ValueError as e:
        raise RsjaxError(f"{sfile}: unreadable ({e}); pass --overwrite to start over") from None
    if overwrite:
        if foreign:
            raise RsjaxError(f"{outdir}: holds files rsjax train did not write ({', '.join(foreign[:5])}); "
                             "refusing to overwrite it")
        for name in OWNED:
            p = outdir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        return False
    old = with_defaults(old, defaults or {})
    diff = [k for k in sorted(set(old) | set(settings)) if k not in RESUMABLE and old.get(k) != settings.get(k)]
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in diff[:4])
        raise RsjaxError(f"{outdir}: holds a run with other settings ({shown}); pass --overwrite to start over "
                         "or choose another OUTDIR")
    return True


def truncate_rows(outdir: Path, epochs_done: int):
    """Keep only the log.txt / metrics.jsonl rows of epochs < ``epochs_done`` (a resumed run rewrites the rest)."""
    log = outdir / "log.txt"
    if log.is_file():
        lines = log.read_text().splitlines()
        keep = [lines[0]] + [ln for ln in lines[1:] if ln.split("\t")[0].isdigit() and int(ln.split("\t")[0]) < epochs_done]
        log.write_text("\n".join(keep) + "\n")
    mj = outdir / "metrics.jsonl"
    if mj.is_file():
        rows = [ln for ln in mj.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] < epochs_done]
        mj.write_text("".join(r + "\n" for r in rows))


def format_time(seconds: float) -> str:
    """h:mm:ss.s (Cohen's column cut ``str(timedelta)`` to 3 characters; this one is readable)."""
    td = datetime.timedelta(seconds=round(seconds, 1))
    s = str(td)
    return s[:-5] if "." in s else s + ".0"


def log_row(epoch, seconds, lr, train_loss, train_acc, test_loss, test_acc) -> str:
    def f(v):
        return "nan" if v is None else f"{v:.4g}"

    return "\t".join([str(epoch), format_time(seconds), f"{lr:.4g}", f(train_loss), f(train_acc), f(test_loss),
                      f(test_acc)])


def plot_curves(metrics_path: Path, out_png: Path):
    """Train loss, train / test accuracy and the learning rate per epoch (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    if not rows:
        return
    ep = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    loss_keys = [k for k in rows[-1] if k.startswith("train_") and k.endswith("loss")]
    for k in loss_keys:
        axes[0].plot(ep, [r.get(k) for r in rows], label=k[len("train_"):])
    if rows[-1].get("test_loss") is not None:
        axes[0].plot(ep, [r.get("test_loss") for r in rows], label="test loss (noisy)")
    axes[0].set_title("loss")
    axes[0].legend(fontsize=8)
    axes[1].plot(ep, [r["train_acc"] for r in rows], label="train")
    if rows[-1].get("test_acc") is not None:
        axes[1].plot(ep, [r.get("test_acc") for r in rows], label="test (noisy)")
    if any("certified_acr" in r for r in rows):
        ax = axes[1].twinx()
        pts = [(r["epoch"], r["certified_acr"]) for r in rows if "certified_acr" in r]
        ax.plot(*zip(*pts), "k.--", label="ACR")
        ax.set_ylabel("ACR")
    axes[1].set_title("accuracy (%)")
    axes[1].legend(fontsize=8)
    axes[2].plot(ep, [r["lr"] for r in rows])
    axes[2].set_yscale("log")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- initial weights


def init_variables(arch: str, num_classes: int, seed: int, init: Optional[str]):
    """Flax variables of ``arch``: a fresh initialisation from ``seed``, or ``init`` (an rsjax model
    directory, or a PyTorch checkpoint read with ``torch.load(weights_only=True)``)."""
    import jax
    import jax.numpy as jnp

    from rsjax.models import build_model, input_shape

    model = build_model(arch, num_classes)
    fresh = model.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + input_shape(arch)))
    fresh = jax.tree_util.tree_map(np.asarray, dict(fresh))
    if init is None:
        return fresh
    path = Path(init).expanduser()
    if path.is_dir():
        from rsjax.classifier import load_classifier, read_meta

        meta = read_meta(path)
        if meta["arch"] != arch or int(meta["num_classes"]) != num_classes:
            raise RsjaxError(f"--init {path}: a {meta['arch']} with {meta['num_classes']} classes, "
                             f"but this run trains a {arch} with {num_classes}")
        f, _ = load_classifier(path, fold_bn=False, pack_narrow=False)
        loaded = jax.tree_util.tree_map(np.asarray, dict(f.variables))
    else:
        import torch

        from converters.pytorch import detect_arch, find_state_dict, strip_prefix, torch_to_flax
        from rsjax.errors import CheckpointError

        if not path.is_file():
            raise RsjaxError(f"--init {path}: no such file or model directory")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - one line for any unreadable file
            raise CheckpointError(f"--init {path}: cannot be read as a weights-only PyTorch checkpoint "
                                  f"({type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})") from None
        sd = find_state_dict(obj, path)[0]
        net = strip_prefix(sd)[0]
        found, ncls, _ = detect_arch(net)
        if found != arch or (ncls is not None and ncls != num_classes):
            raise RsjaxError(f"--init {path}: a {found} with {ncls} classes, but this run trains a {arch} "
                             f"with {num_classes}")
        loaded = torch_to_flax(net, arch, num_classes)
    want = jax.tree_util.tree_structure(fresh)
    if jax.tree_util.tree_structure(loaded) != want:
        raise RsjaxError(f"--init {path}: its variables do not match {arch}")
    return loaded


# ----------------------------------------------------------------------------- the run


def _global_batch(mesh, local: dict, process_count: int):
    """The global, data-sharded arrays of a batch whose process-local share is ``local``."""
    import jax

    from rsjax.training.step import batch_sharding

    sharding = batch_sharding(mesh)
    out = {}
    for k, v in local.items():
        shape = (v.shape[0] * process_count,) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
    return out


def _replicated_batch(mesh, full: dict):
    """Data-sharded arrays of a batch every process holds whole (the test loop)."""
    import jax

    from rsjax.training.step import batch_sharding

    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i]) for k, v in full.items()}


def _checkpoint_manager(directory: Path, keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.resolve(), options=options)


def _pad_rows(tree, n_pad: int):
    return {k: np.concatenate([v, np.zeros((n_pad,) + v.shape[1:], v.dtype)]) if n_pad else v for k, v in tree.items()}


def parse_certify_subset(text: str, length: int):
    parts = text.split(":")
    try:
        start, stop, skip = (int(parts[0]), int(parts[1]), int(parts[2]) if len(parts) > 2 else 1)
    except (ValueError, IndexError):
        raise RsjaxError(f"--certify-subset {text!r}: expected START:STOP:SKIP") from None
    if not (0 <= start < stop <= length and skip >= 1):
        raise RsjaxError(f"--certify-subset {text!r}: need 0 <= START < STOP <= {length} and SKIP >= 1")
    return np.arange(start, stop, skip)


def train(dataset: str, arch: str, outdir, cfg: TrainConfig, objective_cfg=None, *, data_dir=None,
          overwrite: bool = False, devices: Optional[int] = None, progress: bool = True, log=print,
          stop_after_steps: Optional[int] = None):
    """Train ``arch`` on ``dataset`` into ``outdir`` (module doc); returns the final metrics row.

    ``devices``: use the first N local devices (default all; with several processes all devices of
    every process). ``stop_after_steps`` ends the call after that many steps of this call (tests).
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh

    from rsjax.data.datasets import DATASET_INFO
    from rsjax.models import ARCHS, build_model
    from rsjax.training import step as S
    from rsjax.training.data import Pipeline, eval_batches, load_train_data, parse_subset
    from rsjax.training.objectives import get_objective

    outdir = Path(outdir).expanduser()
    objective = get_objective(cfg.method)
    if objective_cfg is None:
        objective_cfg = objective.config()
    if not isinstance(objective_cfg, objective.config):
        raise RsjaxError(f"method {cfg.method!r} takes a {objective.config.__name__}, got {type(objective_cfg).__name__}")
    if dataset not in DATASET_INFO:
        raise RsjaxError(f"unknown dataset {dataset!r}; known: {', '.join(DATASET_INFO)}")
    if arch not in ARCHS:
        raise RsjaxError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    if tuple(ARCHS[arch].input_shape) != tuple(DATASET_INFO[dataset].input_shape):
        raise RsjaxError(f"{arch} takes {ARCHS[arch].input_shape} inputs, {dataset} images are "
                         f"{DATASET_INFO[dataset].input_shape}")
    pc, pi = jax.process_count(), jax.process_index()
    if devices is not None:
        if pc > 1:
            raise RsjaxError("--devices applies to one process; with --distributed every device is used")
        if not 1 <= devices <= jax.local_device_count():
            raise RsjaxError(f"--devices {devices}: this process has {jax.local_device_count()} device(s)")
        mesh_devices = jax.local_devices()[:devices]
    else:
        mesh_devices = jax.devices()
    nd = len(mesh_devices)
    if cfg.batch % nd:
        raise RsjaxError(f"--batch {cfg.batch} is not divisible by the {nd} devices; use a multiple of {nd} "
                         f"(or --devices)")
    num_classes = DATASET_INFO[dataset].num_classes
    from rsjax.kernels.onednn_train import resolve as resolve_kernels

    use_onednn = resolve_kernels(cfg.cpu_kernels)

    # --- everything that can fail on the user's input, before anything is written
    data = load_train_data(dataset, cfg.split, data_dir, cfg.subset)
    if len(data) < nd:
        raise RsjaxError(f"--subset selects {len(data)} images, fewer than the {nd} devices")
    test_split = cfg.test_split if cfg.test_split != "auto" else ("test" if cfg.split == "train" else "none")
    test = None
    if test_split != "none":
        from rsjax.data import load_dataset

        tds = load_dataset(dataset, test_split, data_dir)
        a, b = parse_subset(cfg.test_subset, len(tds))
        tidx = np.arange(a, b)
        tx_, ty_ = tds.batch(tidx)
        test = (tx_.astype(np.float32), ty_.astype(np.int32), tidx.astype(np.int32))
    cert = None
    if cfg.certify_every:
        from rsjax.data import load_dataset

        cds = load_dataset(dataset, "test", data_dir)
        cidx = parse_certify_subset(cfg.certify_subset, len(cds))
        cx, cy = cds.batch(cidx)
        cert = (cx, cy, cidx)
    norm, mean, std = resolve_normalization(cfg, dataset)
    variables = init_variables(arch, num_classes, cfg.seed, cfg.init)
    settings = run_settings(cfg, objective_cfg, dataset, arch, data.fingerprint(), len(data))
    settings["normalization"] = norm
    resuming = prepare_outdir(outdir, settings, overwrite=overwrite,
                              defaults={**to_dict(TrainConfig()), "objective": to_dict(type(objective_cfg)())})

    # --- the computation
    mesh = Mesh(np.array(mesh_devices), (S.DATA_AXIS,))
    pipe = Pipeline(data, batch=cfg.batch, seed=cfg.seed, num_devices=nd, process_index=pi, process_count=pc)
    spe = pipe.steps_per_epoch
    total_steps = cfg.epochs * spe
    model = build_model(arch, num_classes)
    mean_a, std_a = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    import functools

    apply_train = functools.partial(S.train_apply, model, mean_a, std_a, onednn=use_onednn, mesh=mesh)
    apply_eval = functools.partial(S.eval_apply, model, mean_a, std_a)
    tx = S.make_optimizer(lr=cfg.lr, schedule=cfg.lr_schedule, gamma=cfg.lr_gamma, epochs=cfg.epochs,
                          steps_per_epoch=spe, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    n_rows = len(data)
    table = objective.init_example_state(objective_cfg, n_rows, cfg.sigma)
    table = _pad_rows({k: np.asarray(v) for k, v in table.items()}, (-n_rows) % nd)
    names = S.metric_names(objective, objective_cfg, apply_train, num_classes=num_classes,
                           x_shape=(nd,) + data.input_shape, example_state=table, params=params,
                           batch_stats=batch_stats)
    state = S.TrainState(params=params, batch_stats=batch_stats, opt_state=tx.init(params), example_state=table,
                         sums={k: np.zeros((), np.float32) for k in names}, step=np.zeros((), np.int32))
    shardings = S.state_shardings(mesh, state)
    state = jax.tree_util.tree_map(
        lambda a, s: jax.make_array_from_callback(np.shape(a), s, lambda i, a=a: np.asarray(a)[i]), state, shardings)

    writer = pi == 0
    if writer:
        outdir.mkdir(parents=True, exist_ok=True)
        (outdir / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    import orbax.checkpoint as ocp

    mngr = _checkpoint_manager(outdir / "checkpoints", cfg.keep_checkpoints)
    start = 0
    if resuming and mngr.latest_step() is not None:
        abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(_to_tree(abstract)))
        state = _from_tree(restored)
        start = int(jax.device_get(state.step))
        log(f"resuming {outdir} at step {start} (epoch {start // spe}, step {start % spe} of {spe})")
    # what the model metadata says of the run beyond its settings: the kernels of this invocation, and
    # where the weights started, which only the invocation that started the run knows
    fresh = "--init" if cfg.init is not None else "rsjax.models.init"
    run_info = {"kernels": "onednn" if use_onednn else "xla", "initialisation": started_from(outdir) if start else fresh}
    if writer:
        truncate_rows(outdir, start // spe)
        if not (outdir / "log.txt").is_file():
            (outdir / "log.txt").write_text(LOG_HEADER + "\n")

    train_step = S.make_train_step(objective, objective_cfg, tx, apply_train, mesh, state, seed=cfg.seed,
                                   sigma=cfg.sigma, num_classes=num_classes)
    eval_step = S.make_eval_step(apply_eval, mesh, seed=cfg.seed, sigma=cfg.sigma)
    last_row = None
    stop = total_steps if stop_after_steps is None else min(total_steps, start + stop_after_steps)
    step = start
    epoch_started, images_seen, cur_epoch = time.time(), 0, None
    bar = None
    try:
        for step, local in pipe.iterate(start, stop):
            epoch, s_in = divmod(step, spe)
            if epoch != cur_epoch:
                cur_epoch, epoch_started, images_seen = epoch, time.time(), 0
                if progress and writer:
                    from tqdm import tqdm

                    bar = tqdm(total=spe, initial=s_in, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                               mininterval=2.0, dynamic_ncols=True)
            batch = _global_batch(mesh, local, pc)
            state, _ = train_step(state, batch, np.int32(epoch), objective.phase(objective_cfg, epoch))
            images_seen += len(local["y"]) * pc
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{images_seen / max(time.time() - epoch_started, 1e-9):.0f} img/s", refresh=False)
            done = step + 1
            if done % spe == 0:
                if bar is not None:
                    bar.close()
                    bar = None
                jax.block_until_ready(state.sums)
                last_row = _end_epoch(outdir, writer, state, epoch, cfg, objective, objective_cfg, names, spe,
                                      time.time() - epoch_started, images_seen, test, eval_step, mesh, data,
                                      settings, arch, dataset, num_classes, mean, std, norm, n_rows, cert, log,
                                      run_info)
                state = state.replace(sums=jax.tree_util.tree_map(jnp.zeros_like, state.sums))
                mngr.save(done, args=ocp.args.StandardSave(_to_tree(state)))
            elif cfg.checkpoint_every_steps and done % cfg.checkpoint_every_steps == 0:
                mngr.save(done, args=ocp.args.StandardSave(_to_tree(state)))
        mngr.wait_until_finished()
    finally:
        if bar is not None:
            bar.close()
        mngr.close()
    return last_row


def _to_tree(state):
    return {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state,
            "example_state": state.example_state, "sums": state.sums, "step": state.step}


def _from_tree(tree):
    from rsjax.training.step import TrainState

    return TrainState(**tree)


def _host(tree):
    """A (possibly multi-host) pytree as numpy on every process."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def _end_epoch(outdir, writer, state, epoch, cfg, objective, objective_cfg, names, spe, seconds, images_seen, test,
               eval_step, mesh, data, settings, arch, dataset, num_classes, mean, std, norm, n_rows, cert, log,
               run_info):
    """The epoch's rows, model, curves, certification and objective hook (before its checkpoint);
    ``run_info`` (``kernels``: the convolutions the step ran, ``onednn`` or ``xla``; ``initialisation``)
    goes into the model's ``training`` metadata, ``kernels`` into the metrics row too."""
    from rsjax.training.data import eval_batches
    from rsjax.training.step import lr_at_epoch

    sums = {k: float(v) for k, v in _host(state.sums).items()}
    n = max(sums["examples"], 1.0)
    lr = float(f"{float(lr_at_epoch(epoch, lr=cfg.lr, schedule=cfg.lr_schedule, gamma=cfg.lr_gamma, epochs=cfg.epochs)):.6g}")
    row = {"epoch": epoch, "time_s": round(seconds, 3), "lr": lr, "images_per_s": round(images_seen / max(seconds, 1e-9), 1),
           "kernels": run_info["kernels"]}
    for k in names:
        if k not in ("correct", "examples"):
            row[f"train_{k}"] = sums[k] / n
    row["train_acc"] = 100.0 * sums["correct"] / n
    row["test_loss"] = row["test_acc"] = None
    nd = mesh.devices.size
    if test is not None:
        tl = tc = 0.0
        for b in eval_batches(*test, cfg.test_batch, nd):
            l, c = eval_step(state.params, state.batch_stats, _replicated_batch(mesh, b), np.int32(epoch))
            tl, tc = tl + float(l), tc + float(c)
        row["test_loss"], row["test_acc"] = tl / len(test[1]), 100.0 * tc / len(test[1])
    variables = _host({"params": state.params, "batch_stats": state.batch_stats})
    if not variables["batch_stats"]:
        variables = {"params": variables["params"]}
    table = None
    if objective.on_epoch_end is not None:
        table = {k: np.asarray(v)[:n_rows] for k, v in _host(state.example_state).items()}
    meta = {"arch": arch, "dataset": dataset, "num_classes": num_classes, "input_shape": list(data.input_shape),
            "normalization": norm, "mean": list(mean), "std": list(std), "sigma": cfg.sigma,
            "source": "rsjax train", "training": {"method": cfg.method, "epochs": epoch + 1,
                                                   "epochs_planned": cfg.epochs, "steps": (epoch + 1) * spe,
                                                   "data_sha256": settings["data_sha256"],
                                                   "split": cfg.split, "subset": cfg.subset, **run_info,
                                                   "settings": settings}}
    certified = None
    if cert is not None and ((epoch + 1) % cfg.certify_every == 0 or epoch + 1 == cfg.epochs):
        certified = _certify_shares(variables, meta, cfg, cert)
    if writer:
        from rsjax.classifier import save_classifier

        save_classifier(outdir / "model", variables, meta, overwrite=True)
        if table is not None:
            row.update(objective.on_epoch_end(objective_cfg, epoch, table, outdir) or {})
        if certified is not None:
            row.update(_write_certify(outdir, epoch, cert, *certified))
        with open(outdir / "log.txt", "a") as fh:
            fh.write(log_row(epoch, seconds, lr, row.get("train_loss"), row["train_acc"], row["test_loss"],
                             row["test_acc"]) + "\n")
        with open(outdir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        plot_curves(outdir / "metrics.jsonl", outdir / "curves.png")
        test_txt = "" if row["test_acc"] is None else f", test acc {row['test_acc']:.2f}% (noisy)"
        log(f"epoch {epoch}: train loss {row.get('train_loss'):.4f}, train acc {row['train_acc']:.2f}%{test_txt}, "
            f"{row['images_per_s']:.0f} img/s")
    return row


def _certify_shares(variables, meta, cfg, cert):
    """CERTIFY (Cohen) of the epoch's model (built from the in-memory variables) on the fixed test
    subset: each process certifies its share (:func:`rsjax.distributed.host_share`) on its local
    devices; image i's noise depends only on (seed, idx[i]), so the rows are those of one process.
    Returns (prediction, radius, seconds per image) of the whole subset on every process."""
    import jax

    from rsjax.classifier import classifier_from_variables
    from rsjax.core.certify import certify
    from rsjax.distributed import host_share

    f = classifier_from_variables(meta["arch"], variables, meta)
    x, _, idx = cert
    pc = jax.process_count()
    mine = host_share(np.arange(len(idx)))
    t0 = time.time()
    pred, radius, _ = certify(f, x[mine], sigma=cfg.sigma, n0=cfg.certify_n0, n=cfg.certify_n,
                              alpha=cfg.certify_alpha, key=cfg.seed, idx=idx[mine], batch_size=1000)
    per = (time.time() - t0) / max(len(mine), 1)
    if pc == 1:
        return pred, radius, per
    from jax.experimental import multihost_utils

    # process k certified positions k, k + pc, ... (host_share): gather the padded shares, put back
    m = -(-len(idx) // pc)
    share = np.zeros((2, m), np.float64)
    share[0, :len(mine)], share[1, :len(mine)] = pred, radius
    shares = np.asarray(multihost_utils.process_allgather(share))  # (pc, 2, m)
    out_pred, out_radius = np.zeros(len(idx), np.int64), np.zeros(len(idx), np.float64)
    for k in range(pc):
        count = len(range(k, len(idx), pc))
        out_pred[k::pc], out_radius[k::pc] = shares[k, 0, :count], shares[k, 1, :count]
    return out_pred, out_radius, per


def _write_certify(outdir, epoch, cert, pred, radius, per):
    """``certify/epoch_<E>.tsv`` (Cohen's columns) and the epoch's summary metrics."""
    _, y, idx = cert
    d = outdir / "certify"
    d.mkdir(exist_ok=True)
    correct = (pred == y).astype(int)
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
    lines += [f"{i}\t{l}\t{p}\t{r:.3}\t{c}\t{format_time(per)}" for i, l, p, r, c in zip(idx, y, pred, radius, correct)]
    (d / f"epoch_{epoch:04d}.tsv").write_text("\n".join(lines) + "\n")
    acr = float(np.mean(radius * correct))
    return {"certified_acc0": 100.0 * float(correct.mean()), "certified_acr": acr}
