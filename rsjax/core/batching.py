"""``--batch auto``: the forward batch chosen per model and device.

The batch is the number of noisy inputs one device step evaluates. Results never depend on it (the
noise of draw j depends only on the image key and j); only speed and memory do. The choice is

    batch = min(PREFERRED[platform], budget // bytes_per_sample), rounded down to a multiple of 8,

- ``PREFERRED``: the batch past which a bigger one was not measured to help on that platform
  (CPU 400; GPU 2048, not measured yet: the batch at which a CIFAR ResNet-110 forward on a modern
  GPU is commonly saturated; docs/throughput.md);
- ``bytes_per_sample``: XLA's own memory analysis of ``f`` compiled at batches 8 and 16 (arguments,
  outputs and temporaries; the growth per input), times 2 for the noise buffers and the counting;
- ``budget``: a quarter of the device's memory - ``bytes_limit`` of a GPU, the physical memory
  available now on CPU - so ResNet-50 at 224x224 on a small machine gets a batch that fits.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

PREFERRED = {"cpu": 400, "gpu": 2048, "cuda": 2048, "rocm": 2048, "tpu": 2048}
DEFAULT_BATCH_SIZE = PREFERRED["cpu"]  # the Python API's forward batch when none is given
PROBE_BATCH = 8
OVERHEAD = 2.0  # counter buffers (noise, one-hot counts) on top of the forward's own
MEMORY_FRACTION = 0.25


def device_memory_bytes(device=None) -> int | None:
    """Memory a computation may use on ``device``: a GPU's ``bytes_limit``, else available RAM."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU devices may not implement memory_stats
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _compiled_bytes(f, input_shape, dtype, batch):
    x = jax.ShapeDtypeStruct((batch,) + tuple(input_shape), dtype)
    mem = jax.jit(f).lower(x).compile().memory_analysis()
    if mem is None:
        raise RuntimeError("XLA gave no memory analysis for this backend")
    return (getattr(mem, "temp_size_in_bytes", 0) + getattr(mem, "argument_size_in_bytes", 0)
            + getattr(mem, "output_size_in_bytes", 0))


def bytes_per_sample(f, input_shape, dtype=jnp.float32, probe: int = PROBE_BATCH) -> float:
    """Bytes per input of ``logits = f(x)``: the growth of XLA's memory analysis (temporaries +
    arguments + outputs) of the compiled forward from batch ``probe`` to ``2 * probe``, per input -
    so the fixed part (weights, workspace) does not count."""
    small = _compiled_bytes(f, input_shape, dtype, probe)
    large = _compiled_bytes(f, input_shape, dtype, 2 * probe)
    return max(large - small, 1) / probe


def auto_batch_size(f, input_shape, *, device=None, memory_bytes=None, per_sample=None) -> tuple[int, dict]:
    """The forward batch for ``f`` on ``device`` (module doc) and how it was chosen.

    ``memory_bytes`` and ``per_sample`` override the measured device memory and bytes per input
    (for tests and for users who know better). Returns ``(batch, info)``.
    """
    device = device or jax.local_devices()[0]
    preferred = PREFERRED.get(device.platform, PREFERRED["gpu"])
    info = {"platform": device.platform, "preferred": preferred}
    memory_bytes = device_memory_bytes(device) if memory_bytes is None else memory_bytes
    if per_sample is None:
        try:
            per_sample = bytes_per_sample(f, input_shape)
        except Exception as e:  # noqa: BLE001 - fall back to the platform preference
            info["memory_analysis_error"] = f"{type(e).__name__}: {e}"
    batch = preferred
    if memory_bytes and per_sample:
        fits = int(MEMORY_FRACTION * memory_bytes / (OVERHEAD * per_sample))
        info.update(memory_bytes=int(memory_bytes), bytes_per_sample=float(per_sample), fits=fits)
        batch = min(batch, fits)
    batch = max(1, batch - batch % 8 if batch >= 8 else batch)
    info["batch"] = batch
    return batch, info


def parse_batch(value) -> int | str:
    """``--batch`` value: a positive integer (or its decimal string) or ``auto`` (ValueError otherwise)."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "auto":
            return "auto"
        if not text.isdigit():
            raise ValueError(f"--batch must be a positive integer or 'auto', got {value!r}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"--batch must be a positive integer or 'auto', got {value!r}")
    return value


__all__ = ["DEFAULT_BATCH_SIZE", "PREFERRED", "auto_batch_size", "bytes_per_sample", "device_memory_bytes", "parse_batch"]
