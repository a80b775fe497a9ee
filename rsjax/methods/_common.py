"""Helpers shared by the input-specific sigma methods (DDRS, QCRS, Insta-RS).

Randomness layout. Every image has one key per *purpose* (``image_keys(seed, idx, purpose)``,
:mod:`rsjax.core.sampler`). A method that needs several independent batches of draws from one
purpose (one per search round, say) uses the sub-streams

    round_keys(keys, r) = fold_in(keys_i, r)        (r = 0, 1, 2, ...)

so the draws of round r of image i depend only on (seed, idx_i, purpose, r). The certificate
uses the purposes ``select`` and ``estimate`` only; the methods use ``search``, ``optimize``
and ``check`` only (:data:`METHOD_PURPOSES`), so the certificate never sees a draw that chose
sigma (sample splitting).

Estimated radius used by the searches (QCRS, Kung & Chen 2024, section 4; Insta-RS): from counts
of ``num`` draws at sigma and the class c_A fixed beforehand,

    R_hat(sigma) = sigma * Phi^{-1}(pL),  pL = Beta^{-1}(alpha; n_A, num - n_A + 1)   (Clopper-Pearson)

and R_hat = 0 when the draws' own argmax is not c_A or pL < 1/2 (QCRS's FAST_CERTIFY). Draws
with non-finite logits are no vote (they count among the ``num`` trials).

Candidate evaluation: :meth:`rsjax.core.sampler.Counter.candidates` counts M images x C
candidate sigmas x num draws through the one counter of the core.
"""

from __future__ import annotations

import numpy as np

from rsjax.errors import RsjaxError

ABSTAIN = -1
METHOD_PURPOSES = ("search", "optimize", "check")  # the only streams a sigma chooser may draw from


def unpack(classifier):
    """(f, meta, K) of a :class:`rsjax.classifier.Classifier` (or anything with ``.f`` and ``.meta``)."""
    f, meta = getattr(classifier, "f", None), getattr(classifier, "meta", None)
    if not callable(f) or not isinstance(meta, dict) or not meta.get("num_classes"):
        raise RsjaxError("a method needs a rsjax.classifier.Classifier (f and meta with num_classes), got "
                         f"{type(classifier).__name__}")
    return f, meta, int(meta["num_classes"])


def memory_factory(field: str):
    """``Method.memory`` for a method whose config field ``field`` switches the DDRS memory
    (Alfarra et al. 2022) on: the memory saved next to the output, else None."""

    def memory(cfg, out_path):
        if not getattr(cfg, field):
            return None
        from rsjax.methods.memory import Memory

        return Memory.for_output(out_path)

    return memory


def round_keys(keys, r: int):
    """Sub-stream r of each image's key: ``fold_in(keys_i, r)`` (keys: typed (M,))."""
    import jax

    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, np.uint32(r))


def method_keys(seed: int, idx, purpose: str):
    """Per-image keys of one of the methods' purposes (:data:`METHOD_PURPOSES`)."""
    from rsjax.core.sampler import image_keys

    if purpose not in METHOD_PURPOSES:
        raise ValueError(f"a sigma chooser draws only from {METHOD_PURPOSES}, not {purpose!r}")
    return image_keys(int(seed), np.asarray(idx), purpose)


def estimated_radius(counts, cA, sigma, alpha, num=None):
    """R_hat = sigma * Phi^{-1}(CP lower bound of counts[cA] in ``num``); 0 if argmax(counts) != cA
    or pL < 1/2.

    counts: int (..., K) class counts (or (..., K + 1) from the counter: the last column, the
    non-finite draws, is no class); cA: int broadcastable to counts.shape[:-1]; sigma: float same
    shape; num: the draws (default: the sum of ``counts``, non-finite draws included).
    Returns (radius float64 (...), pL float64 (...)). Negative sigma (the reference's sigma - h
    below 0) gives a negative radius, as in the reference.
    """
    from scipy import stats as sps

    from rsjax.core import stats

    counts = np.asarray(counts)
    lead = counts.shape[:-1]
    total = counts.sum(axis=-1) if num is None else np.broadcast_to(np.asarray(num, np.int64), lead)
    cA = np.broadcast_to(np.asarray(cA), lead)
    nA = np.take_along_axis(counts, cA[..., None], axis=-1)[..., 0]
    pL = np.asarray(stats.clopper_pearson_lower(nA.reshape(-1), total.reshape(-1), alpha)).reshape(lead)
    own = np.argmax(counts, axis=-1)
    ok = (own == cA) & (pL >= 0.5)
    radius = np.where(ok, np.asarray(sigma, np.float64) * sps.norm.ppf(np.where(ok, pL, 0.5)), 0.0)
    return radius, pL


def candidate_counter(classifier, batch_size: int):
    """The core's :class:`rsjax.core.sampler.Counter` for a classifier (f, K)."""
    from rsjax.core.sampler import Counter

    f, _, K = unpack(classifier)
    return Counter(f, K, batch_size)


def class_counts(counts):
    """The class columns of the counter's (..., K + 1) counts (drops the non-finite column)."""
    return np.asarray(counts)[..., :-1]


def parse_float_list(text, name):
    """'0.12,0.25' -> (0.12, 0.25); a clear error naming the option otherwise."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return ()
    if isinstance(text, (list, tuple)):
        return tuple(float(v) for v in text)
    try:
        return tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise RsjaxError(f"{name} must be a comma-separated list of numbers, got {text!r}") from None


def training_sigma(meta):
    """The model's training sigma from its metadata (None when unknown)."""
    s = (meta or {}).get("sigma")
    return None if s is None else float(s)
