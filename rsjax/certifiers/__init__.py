"""Certifiers: how a certificate is computed for an image at its noise level sigma.

A method (:mod:`rsjax.methods`) chooses sigma per input; a certifier turns (x, sigma) into a
prediction and a certified radius. ``rsjax certify --certifier NAME`` picks one (default
``cohen``), with the flags generated from its config dataclass (:mod:`rsjax.config`).

A :class:`Certifier` has:

- ``name``: the ``--certifier`` value.
- ``guarantee``: what its rows certify when the method's sigma is global (``fixed`` for Cohen
  CERTIFY; a certifier may also return a per-row ``guarantee`` column).
- ``config``: a frozen dataclass of its options (fields built with :func:`rsjax.config.option`).
- ``build(cfg, classifier, *, seed, batch_size) -> runner`` where ``classifier`` is a loaded
  :class:`rsjax.classifier.Classifier` (``.f``, ``.meta``) and ``runner.certify(x, idx, sigma,
  *, n0, n, alpha, progress=None) -> dict`` of numpy arrays, one entry per image, for the keys
  ``predict`` (int, -1 = abstain), ``radius``, ``pA_lower``, ``nonfinite`` (draws whose logits
  were not all finite, no vote) and the certifier's ``columns``; optionally ``guarantee``.
  ``progress(k)`` is called with the number of noisy forward samples just done. Noise comes
  from :func:`rsjax.core.sampler.image_keys` with ``seed`` and the dataset indices ``idx``.
- ``columns``: names of its extra output columns, in order.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from rsjax.errors import RsjaxError

RESULT_KEYS = ("predict", "radius", "pA_lower", "nonfinite")


@dataclasses.dataclass(frozen=True)
class Certifier:
    name: str
    guarantee: str
    config: type
    build: Callable
    columns: tuple = ()


CERTIFIERS: dict = {}

# modules that register built-in certifiers when imported
BUILTIN_MODULES: tuple = ("rsjax.certifiers.smooth_reduce",)


def register(certifier: Certifier) -> Certifier:
    if not dataclasses.is_dataclass(certifier.config):
        raise TypeError(f"certifier {certifier.name}: config must be a dataclass")
    CERTIFIERS[certifier.name] = certifier
    return certifier


def _load_builtin():
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)


def get_certifier(name: str) -> Certifier:
    _load_builtin()
    if name not in CERTIFIERS:
        raise RsjaxError(f"unknown certifier {name!r}; choose from {', '.join(sorted(CERTIFIERS))}")
    return CERTIFIERS[name]


def all_certifiers() -> dict:
    _load_builtin()
    return dict(CERTIFIERS)


# ------------------------------------------------------------------------------------ cohen

@dataclasses.dataclass(frozen=True)
class CohenConfig:
    """Cohen et al. (2019) CERTIFY has no options beyond N0, N and alpha."""


def build_cohen(cfg: CohenConfig, classifier, *, seed, batch_size):
    """Cohen et al. (2019) CERTIFY / PREDICT: :class:`rsjax.core.certify.CohenRunner` over one
    :class:`rsjax.core.certify.Smoother` (c_A from n0 ``select`` draws, the Clopper-Pearson bound
    from n ``estimate`` draws)."""
    from rsjax.core.certify import CohenRunner

    return CohenRunner(classifier, seed=seed, batch_size=batch_size)


COHEN = register(Certifier(name="cohen", guarantee="fixed", config=CohenConfig, build=build_cohen))

__all__ = ["Certifier", "CohenConfig", "RESULT_KEYS", "all_certifiers", "get_certifier", "register"]
