"""Certification methods: how sigma is chosen for each input before Cohen's CERTIFY.

Every method in rsjax certifies the same way: it picks a noise level sigma_x for each input
using noise of its own (purposes ``search``/``optimize``/``check`` of
:func:`rsjax.core.sampler.image_keys`), then runs Cohen CERTIFY at sigma_x with the fresh
``select`` (n0) and ``estimate`` (n) streams. Sample splitting makes the Clopper-Pearson
bound valid for the smoothed classifier g_{sigma_x} at x, conditional on the search.

A method is a :class:`Method`:

- ``name``: the ``--method`` value.
- ``guarantee``: what an output row certifies (the ``guarantee`` column):
  ``fixed`` (one global sigma, Cohen), ``per-input`` (sigma chosen per input with sample
  splitting: a true certificate of g_{sigma_x} at x, not of one global classifier), or
  ``memory`` (per-input plus DDRS's memory-based consistency check).
- ``add_arguments(parser)``: registers the method's own options on the certify parser
  (option names must not clash with other methods'; prefix them if needed).
- ``build(args, f, meta) -> chooser``: returns ``chooser(x, idx, sigma0) -> (sigma, extras)``
  where ``x`` is float (M, H, W, C), ``idx`` int (M,) dataset indices (derive keys from
  ``args.seed`` and idx), ``sigma0`` float (M,), ``sigma`` float (M,) the chosen levels and
  ``extras`` a dict of per-image numpy columns written to the output (may be empty).
- ``memory``: optional ``memory(args, out_path) -> Memory`` for stateful post-processing
  (DDRS section 4.3). A Memory has ``update(x, predict, radius) -> (predict, radius)`` (numpy
  arrays for one batch of images in dataset order), ``save()`` (called after the rows of a
  batch are written, so a resumed run continues it), and ``changed`` (count of certificates
  it changed).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

GUARANTEES = ("fixed", "per-input", "memory")


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    guarantee: str
    add_arguments: Callable
    build: Optional[Callable]  # None: sigma is the global --sigma (Cohen)
    memory: Optional[Callable] = None
    extra_columns: tuple = ()  # names of the extras columns, in output order
    doc: str = ""


def _no_arguments(parser):
    return None


COHEN = Method(
    name="cohen",
    guarantee="fixed",
    add_arguments=_no_arguments,
    build=None,
    doc="Cohen et al. CERTIFY at one global sigma.",
)

METHODS = {"cohen": COHEN}


def register(method: Method):
    if method.guarantee not in GUARANTEES:
        raise ValueError(f"guarantee must be one of {GUARANTEES}, got {method.guarantee!r}")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    _load_builtin()
    if name not in METHODS:
        from rsjax.errors import RsjaxError

        raise RsjaxError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    return METHODS[name]


def all_methods():
    _load_builtin()
    return dict(METHODS)


# Modules that register input-specific sigma methods (issue 6) when imported.
BUILTIN_MODULES = ("rsjax.methods.ddrs", "rsjax.methods.qcrs", "rsjax.methods.instars")


def _load_builtin():
    import importlib

    for mod in BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a method module not written yet
            if e.name != mod:
                raise
