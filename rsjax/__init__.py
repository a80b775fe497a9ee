"""rsjax: certified robustness by randomized smoothing in JAX/Flax.

Public API (imported lazily so that ``import rsjax`` stays cheap):

- ``load_classifier(path) -> (f, meta)``: a converted model as a pure ``logits = f(x)``
  for ``x`` float32 ``(B, H, W, C)`` in [0, 1].
- ``certify(f, x, *, sigma, n0, n, alpha, key, batch_size)``: Cohen et al. CERTIFY.
- ``predict(f, x, *, sigma, n, alpha, key, batch_size)``: Cohen et al. PREDICT.
"""

__version__ = "0.1.0"

_LAZY = {
    "load_classifier": ("rsjax.classifier", "load_classifier"),
    "save_classifier": ("rsjax.classifier", "save_classifier"),
    "certify": ("rsjax.core.certify", "certify"),
    "predict": ("rsjax.core.certify", "predict"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'rsjax' has no attribute {name!r}")


__all__ = list(_LAZY)
