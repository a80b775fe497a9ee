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
- ``config``: the frozen dataclass of its options (fields made with :func:`rsjax.config.option`);
  the command-line flags, their help and the recorded settings come from it
  (:mod:`rsjax.config`), and its ``__post_init__`` refuses bad values.
- ``build(cfg, classifier, *, seed, batch_size) -> chooser`` (None for Cohen: sigma is the global
  SIGMA). ``classifier`` is a :class:`rsjax.classifier.Classifier`. The chooser is
  ``chooser(x, idx, sigma0) -> (sigma, extras)``: ``x`` float (M, H, W, C), ``idx`` int (M,)
  dataset indices (keys come from ``seed`` and idx), ``sigma0`` float (M,) the command's SIGMA;
  ``sigma`` float (M,) the chosen levels and ``extras`` a dict of per-image columns. A chooser may
  have ``finish(extras, *, predict, radius, pA_lower) -> extras``, called after CERTIFY, for
  columns that depend on the final certificate (QCRS's ``pABar``).
- ``memory``: optional ``memory(cfg, out_path) -> Memory | None`` for stateful post-processing
  (DDRS memory-based certification). A Memory has ``update(x, predict, radius, idx) -> (predict, radius)``
  (numpy arrays for one batch of images in dataset order), ``save()`` (called after the rows of a
  batch are written, so a resumed run continues it), and ``changed`` (count of certificates it
  changed). It starts empty unless ``out_path`` already holds certified rows.
- ``extra_columns``: the names of the chooser's extras, in output order.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Optional

GUARANTEES = ("fixed", "per-input", "memory")


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    guarantee: str
    config: type
    build: Optional[Callable]  # None: sigma is the global SIGMA (Cohen)
    memory: Optional[Callable] = None
    extra_columns: tuple = ()  # names of the extras columns, in output order


@dataclasses.dataclass(frozen=True)
class CohenConfig:
    """Cohen et al. CERTIFY at one global sigma: no options of its own."""


COHEN = Method(name="cohen", guarantee="fixed", config=CohenConfig, build=None)

METHODS = {"cohen": COHEN}

# Modules that register the input-specific sigma methods when imported.
BUILTIN_MODULES = ("rsjax.methods.ddrs", "rsjax.methods.qcrs", "rsjax.methods.instars")


def register(method: Method):
    if method.guarantee not in GUARANTEES:
        raise ValueError(f"guarantee must be one of {GUARANTEES}, got {method.guarantee!r}")
    if not (isinstance(method.config, type) and dataclasses.is_dataclass(method.config)):
        raise TypeError(f"method {method.name!r}: config must be a dataclass type")
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


def _load_builtin():
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)
