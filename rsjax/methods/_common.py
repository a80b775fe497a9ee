"""Helpers shared by the input-specific sigma methods (DDRS, QCRS, Insta-RS).

Randomness layout. Every image has one key per *purpose* (``image_keys(seed, idx, purpose)``,
:mod:`rsjax.core.sampler`). A method that needs several independent batches of draws from one
purpose (one per search round, say) uses the sub-streams

    round_keys(keys, r) = fold_in(keys_i, r)        (r = 0, 1, 2, ...)

so the draws of round r of image i depend only on (seed, idx_i, purpose, r). The certificate
uses the purposes ``select`` and ``estimate`` only; the methods use ``search``, ``optimize``
and ``check`` only, so the certificate never sees a draw that chose sigma (sample splitting).

Estimated radius used by the searches (QCRS section 5.2, Insta-RS section 6): from counts of
``num`` draws at sigma and the class c_A fixed beforehand,

    R_hat(sigma) = sigma * Phi^{-1}(pL),  pL = Beta^{-1}(alpha; n_A, num - n_A + 1)   (Clopper-Pearson)

and R_hat = 0 when the draws' own argmax is not c_A or pL < 1/2 (QCRS's FAST_CERTIFY).

Candidate evaluation (:class:`CandidateCounter`): M images x C candidate sigmas x num draws in
ONE sampler call - each image is repeated C times with its own sigma per copy; all copies of
an image share the image's round key (common random numbers: the C candidates see the same
eps_j, only the scale sigma differs, which makes the comparison between candidates paired).
"""

from __future__ import annotations

import numpy as np

from rsjax.errors import RsjaxError

# jax, scipy and the sampler are imported inside the functions, so that registering the methods
# (``rsjax certify --help``) stays cheap.
ABSTAIN = -1


def memory_factory(option_dest: str):
    """``Method.memory`` for a method whose ``--<name>-memory`` flag is stored as ``option_dest``:
    the DDRS memory (section 4.3) saved next to the output when the flag is on, else None."""

    def memory(args, out_path):
        if not getattr(args, option_dest, False):
            return None
        from rsjax.methods.memory import Memory

        return Memory.for_output(out_path, fresh=getattr(args, "overwrite", False))

    return memory


def image_keys(seed, idx, purpose):
    from rsjax.core.sampler import image_keys as _image_keys

    return _image_keys(seed, idx, purpose)


def round_keys(keys, r: int):
    """Sub-stream r of each image's key: ``fold_in(keys_i, r)`` (keys: typed (M,))."""
    import jax

    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, np.uint32(r))


def method_keys(seed: int, idx, purpose: str):
    """Per-image keys of one purpose (thin wrapper over :func:`image_keys`)."""
    return image_keys(int(seed), np.asarray(idx), purpose)


def estimated_radius(counts, cA, sigma, alpha):
    """R_hat = sigma * Phi^{-1}(CP lower bound of counts[cA]); 0 if argmax(counts) != cA or pL < 1/2.

    counts: int (..., K); cA: int broadcastable to counts.shape[:-1]; sigma: float same shape.
    Returns (radius float64 (...), pL float64 (...)). Negative sigma (the reference's sigma - h
    below 0) gives a negative radius, as in the reference.
    """
    from scipy import stats as sps

    from rsjax.core import stats

    counts = np.asarray(counts)
    lead = counts.shape[:-1]
    cA = np.broadcast_to(np.asarray(cA), lead)
    nA = np.take_along_axis(counts, cA[..., None], axis=-1)[..., 0]
    num = counts.sum(axis=-1)
    pL = np.asarray(stats.clopper_pearson_lower(nA.reshape(-1), num.reshape(-1), alpha)).reshape(lead)
    own = np.argmax(counts, axis=-1)
    ok = (own == cA) & (pL >= 0.5)
    radius = np.where(ok, np.asarray(sigma, np.float64) * sps.norm.ppf(np.where(ok, pL, 0.5)), 0.0)
    return radius, pL


class CandidateCounter:
    """Counts of ``num`` draws for M images x C candidate sigmas, in one sampler call.

    ``__call__(x (M,H,W,C), sigmas (M,C), keys (M,), num) -> int64 (M, C, K)``. Copy (i, c) is
    x_i + sigmas[i, c] * eps_ij with eps_ij drawn from keys[i] (common random numbers across c);
    keys of shape (M, C) give each copy its own draws instead.
    One device step evaluates M*C*b inputs with b = max(1, batch_size // (M*C)) draws per copy.
    """

    def __init__(self, f, num_classes: int, batch_size: int = 1000):
        self.f = f
        self.num_classes = int(num_classes)
        self.batch_size = int(batch_size)
        self._counters = {}
        self.calls = 0  # number of sampler calls made (for tests and benchmarks)
        self.draws = 0  # total noisy forward passes per image (sum over calls of C * num)

    def _counter(self, b):
        from rsjax.core.sampler import make_counter

        if b not in self._counters:
            self._counters[b] = make_counter(self.f, self.num_classes, samples_per_step=b)
        return self._counters[b]

    def __call__(self, x, sigmas, keys, num: int):
        import jax.numpy as jnp

        x = jnp.asarray(x, jnp.float32)
        sigmas = np.asarray(sigmas, np.float32)
        m, c = sigmas.shape
        if x.shape[0] != m:
            raise ValueError(f"x has {x.shape[0]} images but sigmas has {m} rows")
        copies = m * c
        b = max(1, min(int(num), self.batch_size // copies))
        xr = jnp.repeat(x, c, axis=0)
        # keys (M,): common random numbers across an image's candidates; (M, C): one key per copy
        kr = keys.reshape(-1) if keys.ndim == 2 else jnp.repeat(keys, c, axis=0)
        counts = self._counter(b)(xr, jnp.asarray(sigmas.reshape(-1)), kr, num=int(num))
        self.calls += 1
        self.draws += c * int(num)
        return np.asarray(counts, np.int64).reshape(m, c, self.num_classes)


def num_classes_of(f, meta, image_shape):
    """K from meta['num_classes'] or from an abstract evaluation of f."""
    if meta and meta.get("num_classes"):
        return int(meta["num_classes"])
    import jax
    import jax.numpy as jnp

    out = jax.eval_shape(f, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
    return int(out.shape[-1])


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


def batch_size_of(args, default=1000):
    """The forward batch size of the certify command (``--batch``), else ``default``."""
    for name in ("batch", "batch_size"):
        v = getattr(args, name, None)
        if v:
            return int(v)
    return default
