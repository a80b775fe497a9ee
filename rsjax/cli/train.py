"""``rsjax train DATASET ARCH OUTDIR``: Gaussian-augmentation / MACER training (rsjax.training)."""

from __future__ import annotations

import argparse

from rsjax.errors import RsjaxError


def add_parser(p, name="train"):
    from rsjax import config
    from rsjax.training.objectives import OBJECTIVES, _load_plugins
    from rsjax.training.trainer import PRESETS, TrainConfig

    _load_plugins()
    p.add_argument("dataset", help="mnist, cifar10 or imagenet")
    p.add_argument("arch", help="lenet, cifar_resnet20 ... cifar_resnet110, resnet50")
    p.add_argument("outdir", help="run directory (rerun the same command to resume)")
    p.add_argument("--preset", default=None, help="reference hyperparameters: " + ", ".join(
        f"{k} ({v[0]})" for k, v in PRESETS.items()))
    p.add_argument("--data-dir", default=None, help="directory with the standard dataset files (or tfds data)")
    p.add_argument("--overwrite", action="store_true", help="start over in an OUTDIR of another run")
    p.add_argument("--devices", type=int, default=None, help="use the first N local devices (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--distributed", action="store_true", help="multi-host run with jax.distributed")
    p.add_argument("--coordinator", default=None, help="jax.distributed coordinator address host:port")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    config.add_arguments(p, TrainConfig, title="training")
    seen = set()
    for obj in OBJECTIVES.values():
        if obj.config not in seen:
            seen.add(obj.config)
            if [f for f in __import__("dataclasses").fields(obj.config) if f.init]:
                config.add_arguments(p, obj.config, title=f"--method {obj.name}")
    p.set_defaults(func=run)


def config_from(args):
    """(TrainConfig, objective config) from the parsed flags, the preset filling what was not given."""
    import dataclasses

    from rsjax import config
    from rsjax.training.objectives import OBJECTIVES, get_objective
    from rsjax.training.trainer import TrainConfig, get_preset

    base, obj_values = {}, {}
    if args.preset:
        _, p_dataset, p_arch, base, obj_values = get_preset(args.preset)
        if p_dataset != args.dataset:
            raise RsjaxError(f"--preset {args.preset} is for {p_dataset}, not {args.dataset}")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    method = given.get("method", base.get("method", "gaussian"))
    objective = get_objective(method)
    for other in OBJECTIVES.values():
        if other.config is not objective.config:
            flags = [fl for fl in config.given_flags(other.config, args)
                     if fl not in {config.flag_name(f) for f in dataclasses.fields(objective.config)}]
            if flags:
                raise RsjaxError(f"{', '.join(flags)} belong(s) to --method {other.name}, not {method}")
    cfg = TrainConfig(**{**base, **given})
    names = {f.name for f in dataclasses.fields(objective.config)}
    obj_cfg = config.from_args(objective.config, args, **{k: v for k, v in obj_values.items()
                                                           if k in names and getattr(args, k, None) is None})
    return cfg, obj_cfg


def run(args):
    from rsjax.training.trainer import train

    cfg, obj_cfg = config_from(args)
    if args.distributed:
        from rsjax.distributed import initialize

        initialize(args.coordinator, args.num_processes, args.process_id)
    train(args.dataset, args.arch, args.outdir, cfg, obj_cfg, data_dir=args.data_dir, overwrite=args.overwrite,
          devices=args.devices, progress=not args.quiet, stop_after_steps=args.stop_after_steps)
    return 0
