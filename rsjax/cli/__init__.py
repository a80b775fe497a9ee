"""The ``rsjax`` command line: one subcommand per module in this package.

Each subcommand module defines ``add_parser(subparsers)`` (registers its arguments and
sets ``func``) and is imported only when its subcommand runs, so ``rsjax --help`` is fast.
Errors that are the user's fault raise :class:`rsjax.errors.RsjaxError` and are printed as
one line ``rsjax <cmd>: error: ...`` with exit status 2.

The commands that run models (``certify``, ``predict``) first apply :mod:`rsjax.xla`'s measured
XLA settings (CPU flags that help, persistent compilation cache); ``RSJAX_XLA=default`` in the
environment leaves XLA's defaults. Flags the user already set in ``XLA_FLAGS`` win.
"""

import argparse
import importlib
import os
import sys

from rsjax.errors import RsjaxError

# subcommands that run models on the device: they get rsjax.xla's settings
DEVICE_COMMANDS = ("certify", "predict", "train")

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "convert": ("rsjax.cli.convert", "convert a PyTorch checkpoint into an rsjax (Flax/orbax) model"),
    "certify": ("rsjax.cli.certify", "certify a smoothed classifier on a dataset (Cohen CERTIFY and input-specific sigma methods)"),
    "predict": ("rsjax.cli.certify", "predict with a smoothed classifier on a dataset (Cohen PREDICT)"),
    "analyze": ("rsjax.cli.analyze", "certified accuracy, ACR, tables and plots from certification outputs"),
    "merge": ("rsjax.cli.merge", "merge per-host certification parts into one Cohen TSV"),
    "train": ("rsjax.cli.train", "train a base classifier with Gaussian augmentation or MACER (exact resume, all devices)"),
    "export": ("rsjax.cli.export", "export an rsjax model as a PyTorch checkpoint (Cohen or MACER layout)"),
}


def build_parser(argv=None):
    parser = argparse.ArgumentParser(prog="rsjax", description=__doc__.splitlines()[0])
    from rsjax import __version__

    parser.add_argument("--version", action="version", version=f"rsjax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in SUBCOMMANDS.items():
        if wanted is not None and wanted in SUBCOMMANDS and name != wanted:
            sub.add_parser(name, help=help_)
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_, description=help_)
        mod.add_parser(p, name)
    return parser


def apply_xla_settings():
    """rsjax.xla.apply() unless RSJAX_XLA=default or JAX already started (flags are read once)."""
    if os.environ.get("RSJAX_XLA", "rsjax") == "default":
        return None
    from rsjax import xla

    if xla._backend_started():
        return None
    return xla.apply()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command in DEVICE_COMMANDS:
        apply_xla_settings()
    try:
        return args.func(args) or 0
    except RsjaxError as e:
        print(f"rsjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rsjax {args.command}: interrupted (rows written so far are kept; run again to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
