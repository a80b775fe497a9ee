"""rsjax: certified robustness by randomized smoothing in JAX/Flax.

Public API (imported lazily so that ``import rsjax`` stays cheap):

- ``load_classifier(path) -> Classifier``: a converted model; ``f, meta = load_classifier(path)``
  gives a pure ``logits = f(x)`` for ``x`` float32 ``(B, H, W, C)`` in [0, 1] and its metadata
  (``.num_classes``, ``.input_shape``, ``.checksum`` on the object). A damaged model (checksum
  mismatch) or one with NaN/inf weights is a ``CheckpointError``.
- ``certify(f, x, *, sigma, n0, n, alpha, key, idx, batch_size, num_classes, check_range)``:
  Cohen et al. CERTIFY -> ``(prediction, radius, pA_lower)``.
- ``predict(f, x, *, sigma, n, alpha, key, idx, batch_size, num_classes, check_range)``:
  Cohen et al. PREDICT -> ``prediction``.
- ``smooth_reduce_certify(f, x, *, sigma, n0, n, alpha, key, idx, batch_size, config)``:
  Smooth-Reduce (Joshi et al. 2022) patch smoothing -> dict of per-image columns, with the
  reference's ``radius_raw`` and the image-space ``radius`` (docs/smooth_reduce.md).

Inputs to ``certify`` / ``predict``: ``x`` must be float images in [0, 1], shaped (M, H, W, C)
(channels last). Integer images (uint8 0-255) are refused - divide by 255 -, as are NCHW
batches, a single 3-D image (pass ``x[None]``), NaN/inf pixels and values outside [0, 1] beyond
rounding; pass ``check_range=False`` for a model defined on another range. Every refusal is an
``rsjax.errors.RsjaxError`` with one line naming the problem (``rsjax.core.certify.check_images``).
A noisy draw whose logits are not all finite is no vote for any class (it counts against the
top class); ``certify`` / ``predict`` warn (``RuntimeWarning``) when there were any, and
``rsjax.core.certify.Smoother(f, K).certify(...)`` returns their number per image as a fourth
value (``nonfinite``).
"""

__version__ = "0.1.0"

_LAZY = {
    "load_classifier": ("rsjax.classifier", "load_classifier"),
    "save_classifier": ("rsjax.classifier", "save_classifier"),
    "certify": ("rsjax.core.certify", "certify"),
    "predict": ("rsjax.core.certify", "predict"),
    "smooth_reduce_certify": ("rsjax.certifiers.smooth_reduce", "smooth_reduce_certify"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'rsjax' has no attribute {name!r}")


__all__ = list(_LAZY)
