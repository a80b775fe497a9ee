"""XLA / JAX settings for throughput (what each was measured to do: docs/throughput.md).

Call :func:`apply` *before* JAX initialises its backend (before the first array is created).
``rsjax certify`` and ``rsjax predict`` call it by default (``RSJAX_XLA=default`` in the
environment opts out; flags the user already put in ``XLA_FLAGS`` win); the benchmarks do it
with ``--xla rsjax``; a shell can export the same settings with ``eval "$(python -m rsjax.xla)"``.
Nothing here
changes results beyond float rounding of the same function; every choice is recorded by the
benchmarks in their JSON (``settings``, ``xla_flags``).

- ``CPU_FLAGS`` are the XLA:CPU flags measured to help inference (certify, predict); the settings
  tried and not adopted are listed in docs/throughput.md so that nobody has to measure them again.
  The training step is slower with them (docs/training.md, "No inference flags"), so ``rsjax
  train`` leaves XLA's flags alone (``apply(cpu_flags=False)``).
- The persistent compilation cache (``jax_compilation_cache_dir``) lets a later run with the same
  model and shapes load compiled counters instead of compiling them; it does not change the
  steady-state rate.
- :func:`pack_narrow_convs` says where width-packing the narrow (<= 16-channel) 3x3 convolutions
  (``rsjax.models.pack``) is the faster layout: only where the XLA flags hand convolutions to
  YNNPACK (as ``CPU_FLAGS`` do); ``rsjax certify`` passes its answer to
  :func:`rsjax.load_classifier`.
- GPU: no GPU flag is recommended. XLA:GPU already fuses conv + bias + ReLU through cuDNN, which
  BatchNorm folding (``rsjax.models.fold``) enables; ``jax_default_matmul_precision`` stays at its
  default (TF32 on Ampere and later for float32 convolutions) - pass ``precision="highest"`` to
  :func:`apply` to force full float32.
"""

from __future__ import annotations

import os
from pathlib import Path

# XLA:CPU flags measured to help (see module doc); applied by apply(platform="cpu").
CPU_FLAGS: tuple[str, ...] = (
    # elementwise fusions, convolutions and dots handed to YNNPACK (the elementwise part helps)
    "--xla_cpu_experimental_ynn_fusion_type=individual_convolution,eltwise,dot",
)

GPU_FLAGS: tuple[str, ...] = ()

# width packing pays only where convolutions go to YNNPACK (docs/throughput.md)
_YNN_CONV = "individual_convolution"


def pack_narrow_convs(backend: str | None = None, xla_flags: str | None = None, *, folded: bool = True) -> bool:
    """Whether width-packing narrow convolutions is the faster layout here: for a BN-folded model
    (an unfolded BN adds its bias in the unpacked layout, the slow one) on CPU, when the XLA flags
    hand convolutions to YNNPACK (as ``CPU_FLAGS`` do). ``backend`` defaults to JAX's default
    backend, ``xla_flags`` to the ``XLA_FLAGS`` environment variable."""
    if not folded:
        return False
    if backend is None:
        import jax

        backend = jax.default_backend()
    flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    ynn = [f.split("=", 1)[1] for f in flags.split() if f.startswith("--xla_cpu_experimental_ynn_fusion_type=")]
    return backend == "cpu" and bool(ynn) and _YNN_CONV in ynn[-1].split(",")

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rsjax" / "jax_cache"


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge._backends)  # noqa: SLF001 - no public query exists
    except Exception:  # noqa: BLE001
        return False


def merged_xla_flags(flags, existing: str = "") -> str:
    """``existing`` XLA_FLAGS plus ``flags``; a flag the user already set keeps the user's value."""
    have = {f.split("=", 1)[0] for f in existing.split()}
    add = [f for f in flags if f.split("=", 1)[0] not in have]
    return " ".join(existing.split() + add)


def apply(platform: str | None = None, *, cache_dir=DEFAULT_CACHE, precision: str | None = None,
          cpu_flags: bool = True) -> dict:
    """Apply the recommended settings; returns what was set (for the benchmark records).

    ``platform``: "cpu" or "gpu" (default: from ``JAX_PLATFORMS``, else cpu and gpu flags
    are both set - XLA ignores the other backend's flags). ``cache_dir=None`` disables the
    persistent compilation cache; by default it is ``JAX_COMPILATION_CACHE_DIR`` if set, else
    ``DEFAULT_CACHE``. Raises RuntimeError if JAX's backend already started, since
    XLA reads its flags only once. ``cpu_flags=False`` sets only the cache and precision (``rsjax
    train``: the CPU flags slow the training step, docs/training.md).
    """
    if _backend_started():
        raise RuntimeError("rsjax.xla.apply() must run before JAX creates its first array (XLA reads its flags once)")
    platform = platform or os.environ.get("JAX_PLATFORMS", "").split(",")[0] or None
    flags = list(CPU_FLAGS if platform in (None, "cpu") and cpu_flags else ()) + list(
        GPU_FLAGS if platform in (None, "gpu", "cuda") else ())
    os.environ["XLA_FLAGS"] = merged_xla_flags(flags, os.environ.get("XLA_FLAGS", ""))
    out = {"xla_flags_added": flags}
    # environment variables (not only jax.config) so that subprocesses - `rsjax certify` run by
    # a benchmark - get the same settings
    if cache_dir is DEFAULT_CACHE and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        cache_dir = Path(os.environ["JAX_COMPILATION_CACHE_DIR"])  # the user's choice wins
    if cache_dir is not None:
        try:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            if not os.access(cache_dir, os.W_OK):
                raise PermissionError(f"{cache_dir} is not writable")
        except OSError as e:
            import warnings

            warnings.warn(f"compilation cache {cache_dir} unusable ({e}); running without it", RuntimeWarning,
                          stacklevel=2)
            cache_dir = None
    if cache_dir is not None:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1.0"
        out["compilation_cache_dir"] = str(cache_dir)
    if precision is not None:
        os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = precision
        out["default_matmul_precision"] = precision
    import jax

    if cache_dir is not None:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if precision is not None:
        jax.config.update("jax_default_matmul_precision", precision)
    return out


def shell_exports(platform: str | None = "cpu", cache_dir=DEFAULT_CACHE) -> str:
    """The same settings as shell ``export`` lines (``eval "$(python -m rsjax.xla)"`` opts a
    shell - and every ``rsjax`` command run from it - in)."""
    flags = list(CPU_FLAGS if platform in (None, "cpu") else ()) + list(GPU_FLAGS if platform in (None, "gpu") else ())
    lines = [f"export XLA_FLAGS='{merged_xla_flags(flags, os.environ.get('XLA_FLAGS', ''))}'"]
    if cache_dir is not None:
        lines += [f"export JAX_COMPILATION_CACHE_DIR='{cache_dir}'", "export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1.0"]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(shell_exports(sys.argv[1] if len(sys.argv) > 1 else "cpu"))


__all__ = ["CPU_FLAGS", "GPU_FLAGS", "DEFAULT_CACHE", "apply", "merged_xla_flags", "pack_narrow_convs",
           "shell_exports"]
