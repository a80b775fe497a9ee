"""Scale-out: data parallel over the local devices, and dataset sharding across hosts.

**Local devices** (:func:`make_parallel_counter`). The ``num`` draws of every image are split
into D contiguous ranges of ``q = ceil(num / D)`` draw indices, one per device of a 1-D mesh
(axis ``"d"``): device d evaluates the draws ``d*q <= l < min((d+1)*q, num)`` of all M images in
flight and the per-device histograms are summed with ``psum``. Draw l of image i is
``x_i + sigma_i * normal(fold_in(key_i, offset + l))`` on whichever device evaluates it (see
:mod:`rsjax.core.sampler`), so the counts equal those of one device for the same keys, exactly;
and since the split is over draws, not images, one image with CERTIFY's n = 100,000 keeps every
device busy. The images, sigmas and keys are replicated (a few KB); only the ``(M, K)`` counts
leave the devices. :func:`rsjax.core.sampler.make_counter` uses this automatically when more
than one local device exists, so ``rsjax certify`` scales without new options.

**Several hosts** (:func:`initialize`, :func:`host_share`, :func:`part_path`). Each process of a
``jax.distributed`` job certifies its own share of the dataset indices with its local devices
and writes its own part ``OUTFILE.part<k>of<n>`` (k = process index, 0-based, n = process
count); ``rsjax merge`` joins the parts into one Cohen TSV. Results do not depend on the split:
an image's noise depends only on (seed, dataset index). No cross-host collective runs during
certification, so a slow or failed host only delays its own part, which resumes like any
``rsjax certify`` output.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rsjax.core.sampler import balanced_steps, bind_weights, scan_counts, split_weights
from rsjax.errors import RsjaxError

AXIS = "d"


def local_mesh(devices=None) -> Mesh:
    """1-D mesh (axis ``"d"``) over ``devices`` (default: this process's local devices)."""
    devices = list(jax.local_devices() if devices is None else devices)
    return Mesh(np.array(devices), (AXIS,))


def draw_ranges(num: int, num_devices: int):
    """[(first, stop)] per device: contiguous ranges of ``q = ceil(num / D)`` draws covering
    ``0..num-1`` exactly once (the last ranges may be shorter or empty)."""
    q = -(-num // num_devices)
    return [(min(d * q, num), min((d + 1) * q, num)) for d in range(num_devices)]


def make_parallel_counter(f, num_classes: int, *, samples_per_step: int, devices=None):
    """``counts(x, sigma, keys, num, offset=0) -> int32[M, K]`` over all ``devices`` (module doc).

    Same signature and same results as :func:`rsjax.core.sampler.make_counter` on one device;
    ``samples_per_step`` is per device (one step of each device runs ``M * samples_per_step``
    forward passes).
    """
    if samples_per_step < 1:
        raise ValueError(f"samples_per_step must be >= 1, got {samples_per_step}")
    mesh = local_mesh(devices)
    n_dev = mesh.devices.size
    apply, weights = split_weights(f)
    if weights is not None:  # replicated once on the mesh (weights committed elsewhere would not fit the mesh)
        weights = jax.device_put(weights, NamedSharding(mesh, P()))

    @functools.partial(jax.jit, static_argnames=("num",))
    def counts_with(weights, x, sigma, keys, num: int, offset=0):
        q = -(-num // n_dev)
        steps, b = balanced_steps(q, samples_per_step)
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (x.shape[0],))
        offset = jnp.asarray(offset, jnp.uint32)

        def per_device(weights, x, sigma, keys, offset):
            d = jax.lax.axis_index(AXIS).astype(jnp.uint32)
            first = d * q
            stop = jnp.minimum(first + q, num)
            acc = scan_counts(functools.partial(apply, weights), num_classes, x, sigma, keys, offset,
                              first=first, stop=stop, steps=steps, b=b)
            return jax.lax.psum(acc, AXIS)

        return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(), P(), P()), out_specs=P(),
                             check_vma=False)(weights, x, sigma, keys, offset)

    return bind_weights(counts_with, weights)


# --------------------------------------------------------------------------- several hosts

def initialize(coordinator_address=None, num_processes=None, process_id=None):
    """Start ``jax.distributed`` (arguments as there; on managed clusters all may be None)
    and return ``(process_index, process_count)``. Calling it twice is harmless."""
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
    k = jax.process_index() if process_index is None else int(process_index)
    n = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= k < n:
        raise RsjaxError(f"process index {k} is not in 0..{n - 1}")
    return np.asarray(indices)[k::n]


def part_path(outfile, process_index: int, process_count: int) -> str:
    """``OUTFILE.part<k>of<n>``: the file process k of n writes (``rsjax merge`` joins them)."""
    return f"{os.fspath(outfile)}.part{int(process_index)}of{int(process_count)}"


__all__ = ["AXIS", "local_mesh", "draw_ranges", "make_parallel_counter", "initialize", "host_share", "part_path"]
