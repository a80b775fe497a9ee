"""XLA / JAX settings for throughput, with what each was measured to do.

Call :func:`apply` *before* JAX initialises its backend (before the first array is created).
``rsjax certify`` and ``rsjax predict`` call it by default (``RSJAX_XLA=default`` in the
environment opts out; flags the user already put in ``XLA_FLAGS`` win); the benchmarks do it
with ``--xla rsjax``; a shell can export the same settings with ``eval "$(python -m rsjax.xla)"``.
Nothing here
changes results beyond float rounding of the same function; every choice is recorded by the
benchmarks in their JSON (``settings``, ``xla_flags``).

Measured on the development machine (2-core AMD EPYC with AVX-512 + AVX512-BF16, jax 0.10.2,
CIFAR ResNet-110, batch 200-400; see benchmarks/README.md for the numbers and the load):

- ``CPU_FLAGS`` are the XLA:CPU flags that the A/B runs showed to help (empty if none did);
  flags that were tried and did not help are listed in ``CPU_TRIED`` with the outcome, so that
  nobody has to measure them again.
- The persistent compilation cache (``jax_compilation_cache_dir``) lets a later run with the same
  model and shapes load compiled counters instead of compiling them; it does not change the
  steady-state rate, and its saving on ``rsjax certify`` start-up has not been isolated yet.
- ``pack_narrow_convs`` says where width-packing the narrow (<= 16-channel) 3x3 convolutions
  (``rsjax.models.pack``) pays: with CPU_FLAGS, ResNet-110 485-528 -> 535-564 samples/s (+5-10%,
  interleaved A/B, rows of 2026-11-21 15:21-15:22 in benchmarks/results/throughput.md); under XLA's
  default convolution emitter it is slower (324 -> 213), so it is off there.
- GPU: no GPU figure has been measured yet, so no GPU flag is recommended. XLA:GPU already
  fuses conv + bias + ReLU through cuDNN, which BatchNorm folding (``rsjax.models.fold``)
  enables; ``jax_default_matmul_precision`` stays at its default (TF32 on Ampere and later for
  float32 convolutions) - pass ``precision="highest"`` to :func:`apply` to force full float32.
"""

from __future__ import annotations

import os
from pathlib import Path

# XLA:CPU flags measured to help (see module doc); applied by apply(platform="cpu").
CPU_FLAGS: tuple[str, ...] = (
    # Hand elementwise fusions, convolutions and dots to YNNPACK. The elementwise part is what
    # helps: ResNet-110 counter (noise + forward + counts, BN folded, float32, batch 400) 316 ->
    # 515 samples/s at low load (benchmarks/results), +18-27% in interleaved A/B runs under load. It makes threefry noise generation
    # ~3x slower (still < 5% of a ResNet-110 step), which the measured figure includes.
    "--xla_cpu_experimental_ynn_fusion_type=individual_convolution,eltwise,dot",
)

# Tried on the development machine (interleaved A/B against the default or CPU_FLAGS, folded
# ResNet-110, batch 200); kept out of CPU_FLAGS because they did not help there.
CPU_TRIED = {
    "--xla_cpu_experimental_ynn_fusion_type=individual_convolution": "-10% (convolutions alone via YNNPACK)",
    "--xla_cpu_experimental_ynn_fusion_type=individual_convolution,dot": "-20%",
    "--xla_cpu_experimental_ynn_fusion_type=eltwise": "same as CPU_FLAGS (eltwise is the part that helps)",
    "--xla_cpu_experimental_ynn_fusion_type=...,reduce": "no change",
    "--xla_cpu_use_onednn=true": "within noise alone (+8% in one run); no gain on top of CPU_FLAGS",
    "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true": "no gain (float32 and bfloat16)",
    "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise": "within noise",
    "--xla_cpu_experimental_xnn_fusion_type=individual_convolution,eltwise,dot": "-5%",
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY": "no gain",
    "bfloat16 forward (--dtype bfloat16)": "no gain on XLA:CPU (within 5% of float32, with or without "
                                          "these flags): XLA's CPU convolutions do not use AVX512-BF16 here",
    # session 2 (ResNet-110 with real-valued BN biases, batch 400, low load, rsjax only, A/B)
    "--xla_cpu_experimental_xnn_fusion_type=individual_convolution,eltwise,dot "
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY": "322 (= default XLA); with width packing 211",
    "--xla_cpu_experimental_xnn_fusion_type=eltwise --xla_cpu_experimental_ynn_fusion_type=individual_convolution": "191 (packed)",
    "width packing, bias added in the unpacked layout": "2.5x slower (212-232 vs 520): a relayout copy per layer; "
                                                      "rsjax.models.pack adds folded-BN biases packed instead",
    "packing 2 images into channels (block-diagonal 32x32 kernel)": "no gain over the unpacked 16-channel convolution",
    "grouped convolution (feature_group_count=2) for the same": "~13x slower: no fast grouped path",
    "shifted width packing (3x2 packed kernel, 1.33x instead of 2x the MACs)": "5% slower than the 3x3 packing",
    "im2col / sum of 9 shifted dots instead of convolution": "4-40x slower (the patches are materialised)",
    "Box-Muller noise instead of jax.random.normal's erf_inv": "+2-5% (erf_inv is slow under the YNNPACK eltwise "
                                                              "fusion); not adopted: it would change every noise "
                                                              "stream and so every documented result",
    "batch per step 25 / 50 / 100 / 400": "within 4% of each other (no cache effect)",
    "Winograd F(2x2,3x3) convolutions written in JAX (transforms + 16 batched dots)": "4-9x slower than the direct "
        "convolution on the stage-2/3 shapes (the transforms are memory passes XLA does not fuse into the dots)",
    "weights as jit arguments instead of constants (rsjax.core.sampler.split_weights)": "same speed (kept: the "
        "compiled counter no longer depends on the weights)",
}

GPU_FLAGS: tuple[str, ...] = ()

# Width packing of narrow 3x3 convolutions (rsjax.models.pack) pays only where the convolutions
# go to YNNPACK: folded ResNet-110 (real-valued biases), batch 400, float32, low load: 485-528 ->
# 535-564 samples/s with CPU_FLAGS; without them (XLA's default convolution emitter) 324 -> 213.
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


def apply(platform: str | None = None, *, cache_dir=DEFAULT_CACHE, precision: str | None = None) -> dict:
    """Apply the recommended settings; returns what was set (for the benchmark records).

    ``platform``: "cpu" or "gpu" (default: from ``JAX_PLATFORMS``, else cpu and gpu flags
    are both set - XLA ignores the other backend's flags). ``cache_dir=None`` disables the
    persistent compilation cache; by default it is ``JAX_COMPILATION_CACHE_DIR`` if set, else
    ``DEFAULT_CACHE``. Raises RuntimeError if JAX's backend already started, since
    XLA reads its flags only once.
    """
    if _backend_started():
        raise RuntimeError("rsjax.xla.apply() must run before JAX creates its first array (XLA reads its flags once)")
    platform = platform or os.environ.get("JAX_PLATFORMS", "").split(",")[0] or None
    flags = list(CPU_FLAGS if platform in (None, "cpu") else ()) + list(GPU_FLAGS if platform in (None, "gpu", "cuda") else ())
    os.environ["XLA_FLAGS"] = merged_xla_flags(flags, os.environ.get("XLA_FLAGS", ""))
    out = {"xla_flags_added": flags}
    # environment variables (not only jax.config) so that subprocesses - `rsjax certify` run by
    # a benchmark - get the same settings
    if cache_dir is DEFAULT_CACHE and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        cache_dir = Path(os.environ["JAX_COMPILATION_CACHE_DIR"])  # the user's choice wins
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
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


__all__ = ["CPU_FLAGS", "CPU_TRIED", "GPU_FLAGS", "DEFAULT_CACHE", "apply", "merged_xla_flags", "pack_narrow_convs",
           "shell_exports"]
