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


def _cache_dir_writable(path) -> OSError | None:
    """None when ``path`` can hold the compilation cache, else the OSError that says why not."""
    import tempfile
    from pathlib import Path

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".rsjax-probe-"):
            pass
    except OSError as e:
        return e
    return None


def apply_xla_settings(command="certify"):
    """rsjax.xla.apply() unless RSJAX_XLA=default or JAX already started (flags are read once);
    for ``train`` without the XLA flags (they are inference settings; rsjax.xla).

    An unwritable compilation-cache directory is a warning: the run goes on without the cache.
    """
    if os.environ.get("RSJAX_XLA", "rsjax") == "default":
        return None
    from rsjax import xla

    if xla._backend_started():
        return None
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or xla.DEFAULT_CACHE
    err = _cache_dir_writable(cache)
    cpu_flags = command != "train"
    if err is None:
        return xla.apply(cpu_flags=cpu_flags)
    print(f"rsjax {command}: warning: compilation cache disabled: {cache}: {err.strerror or err}", file=sys.stderr)
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    return xla.apply(cache_dir=None, cpu_flags=cpu_flags)


_INTERRUPTED = False


def interrupted() -> bool:
    """True once SIGINT arrived in this process (even if something swallowed the KeyboardInterrupt)."""
    return _INTERRUPTED


def check_interrupt():
    """Raise KeyboardInterrupt if SIGINT arrived (the run's checkpoints call this, so an
    interrupt that something swallowed still stops the run)."""
    if _INTERRUPTED:
        raise KeyboardInterrupt


def _note_sigint(signum, frame):
    global _INTERRUPTED
    _INTERRUPTED = True


def _on_sigint(signum, frame):
    _note_sigint(signum, frame)
    raise KeyboardInterrupt


def _import_jax_deferring_sigint():
    """Import jax with SIGINT only noted: a KeyboardInterrupt raised inside a native extension's
    module initialisation (jaxlib's) can abort the interpreter instead of unwinding; the noted
    interrupt is raised right after the import (:func:`check_interrupt`)."""
    import signal

    handler = signal.signal(signal.SIGINT, _note_sigint)
    try:
        import jax  # noqa: F401
    finally:
        signal.signal(signal.SIGINT, handler)
    check_interrupt()


def _quiet_unraisable(previous):
    """A ``sys.unraisablehook`` that drops KeyboardInterrupt: raised inside a callback that cannot
    propagate it (JAX's garbage-collection callback), it would print a traceback and be lost; the
    flag it set stops the run at the next :func:`check_interrupt`."""
    def hook(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            return
        previous(unraisable)

    return hook


def _os_error_line(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}"


def main(argv=None):
    """Run one subcommand; returns its exit status: 0, 2 (an error, one line) or 130 (interrupted).

    SIGINT at any moment (even while JAX is imported) ends with exit 130 and one line; an
    interrupt that a library swallowed still makes the exit status 130, never 0.
    """
    import signal

    global _INTERRUPTED
    _INTERRUPTED = False
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if a in SUBCOMMANDS), "")
    previous = signal.signal(signal.SIGINT, _on_sigint)
    previous_hook, sys.unraisablehook = sys.unraisablehook, _quiet_unraisable(sys.unraisablehook)
    try:
        try:
            if command in DEVICE_COMMANDS:
                _import_jax_deferring_sigint()
            parser = build_parser(argv)
            args = parser.parse_args(argv)
            check_interrupt()
            if args.command in DEVICE_COMMANDS:
                apply_xla_settings(args.command)
                if args.command == "train" and os.environ.get("RSJAX_MALLOC", "retain") != "default":
                    from rsjax.heap import retain_freed_memory

                    retain_freed_memory()  # before JAX's thread pools start (rsjax.heap)
                check_interrupt()
            status = args.func(args) or 0
        except RsjaxError as e:
            if _INTERRUPTED:
                raise KeyboardInterrupt from None
            print(f"rsjax {command}: error: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            if _INTERRUPTED:
                raise KeyboardInterrupt from None
            print(f"rsjax {command}: error: {_os_error_line(e)}", file=sys.stderr)
            return 2
        if _INTERRUPTED:
            raise KeyboardInterrupt
        return status
    except KeyboardInterrupt:
        kept = " (rows written so far are kept; run again to resume)" if command in DEVICE_COMMANDS else ""
        print(f"rsjax {command}: interrupted{kept}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook


if __name__ == "__main__":
    sys.exit(main())
