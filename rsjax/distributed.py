"""Several hosts: ``jax.distributed`` start-up, each process's share of the dataset, part files.

Each process of a ``jax.distributed`` job certifies (or, later, trains on) its own share of the
dataset indices with its local devices (the counter's device mesh, :mod:`rsjax.core.sampler`) and
writes its own part ``OUTFILE.part<k>of<n>`` (k = process index, 0-based, n = process count);
``rsjax merge`` joins the parts into one Cohen TSV. Results do not depend on the split: an
image's noise depends only on (seed, dataset index). No cross-host collective runs during
certification, so a slow or failed host only delays its own part, which resumes like any
``rsjax certify`` output.
"""

from __future__ import annotations

import os

import numpy as np

from rsjax.errors import RsjaxError


def initialize(coordinator_address=None, num_processes=None, process_id=None):
    """Start ``jax.distributed`` (arguments as there; on managed clusters all may be None)
    and return ``(process_index, process_count)``. Calling it twice is harmless."""
    import jax

    if num_processes is not None and num_processes < 1:
        raise RsjaxError(f"num_processes must be >= 1, got {num_processes}")
    if num_processes == 1:
        return 0, 1
    if not _distributed_is_initialized():
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    return jax.process_index(), jax.process_count()


def _distributed_is_initialized() -> bool:
    try:
        from jax._src import distributed

        return distributed.global_state.client is not None
    except Exception:  # noqa: BLE001 - private API moved: assume not initialised
        return False


def host_share(indices, process_index: int | None = None, process_count: int | None = None):
    """This process's share of the dataset ``indices``: every n-th from position k
    (``indices[k::n]``), so the images - and their cost - interleave evenly across hosts and
    the shares are disjoint and cover ``indices``."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    k, n = int(process_index), int(process_count)
    if not 0 <= k < n:
        raise RsjaxError(f"process index {k} is not in 0..{n - 1}")
    return np.asarray(indices)[k::n]


def part_path(outfile, process_index: int, process_count: int) -> str:
    """``OUTFILE.part<k>of<n>``: the file process k of n writes (``rsjax merge`` joins them)."""
    return f"{os.fspath(outfile)}.part{int(process_index)}of{int(process_count)}"


__all__ = ["initialize", "host_share", "part_path"]
