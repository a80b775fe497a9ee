"""The linear maps of Smooth-Reduce (Joshi et al. 2022): resize, patch extraction, their norms.

An image x (h, w, C) is resized to z = U x (H, W, C) and cut into P patches of p x p:

    z[i, j, c]  = sum_{a, b} R_h[i, a] R_w[j, b] x[a, b, c]          (U = R_h (x) R_w per channel)
    patch_k     = z[r_k : r_k + p, s_k : s_k + p, :]                  (A_k, corner (r_k, s_k))

``R`` are the one-axis interpolation matrices of ``torch.nn.functional.interpolate`` as
torchvision's ``Resize`` calls it on tensors: ``bilinear`` with ``align_corners=False`` and
``antialias=True`` (PIL's triangle filter, support widened by the scale when shrinking), and
``nearest`` (PyTorch's legacy rule, source index ``floor(i * in / out)``).

Both certificates of :mod:`rsjax.certifiers.smooth_reduce` need an operator norm of these maps.
Let ``c[i, j]`` be the number of patches that cover pixel (i, j) of z (the coverage). Because
every map acts on each channel alike, the norms are those of one channel:

- stacked patches with independent noise: ``||A U||^2 = lambda_max(U^T diag(c) U)`` because
  ``A^T A = diag(c)`` (each patch copies the pixels it covers once);
- shared noise: the smoothed classifier reads z only where some patch covers it, so the norm
  that matters is that of ``Pi U`` with Pi the projection on covered pixels,
  ``||Pi U||^2 = lambda_max(U^T diag(1[c > 0]) U)``.

Both are at most ``sqrt(c_max) ||U||`` and ``||U|| = ||R_h|| ||R_w||`` (singular values of a
Kronecker product multiply). :func:`weighted_norm` computes ``sqrt(lambda_max(U^T diag(c) U))``
exactly (a dense symmetric eigenproblem) when the image is small, in closed form when the
coverage is a product ``c = c_r (x) c_c`` (a full dense grid), and otherwise returns the sound
bound ``sqrt(max c) ||U||``.
"""

from __future__ import annotations

import numpy as np

# Relative margin added to computed norms so that eigensolver rounding (about 1e-13 relative in
# float64 at these sizes) can never make a radius larger than the exact one.
NORM_MARGIN = 1e-9
# Largest h * w for which U^T diag(c) U (h w x h w) is built and diagonalised densely.
DENSE_PIXELS = 4096


def interp_matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """(n_out, n_in) float64 matrix R of one axis of ``F.interpolate(..., mode, align_corners=False,
    antialias=True)`` (bilinear) or ``mode="nearest"``: ``y = R @ x`` along that axis."""
    r = np.zeros((n_out, n_in), np.float64)
    if mode == "nearest":
        # PyTorch's nearest_idx: src = min(floor(i * scale), n_in - 1), scale = n_in / n_out in float32
        scale = np.float32(n_in) / np.float32(n_out)
        src = np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)
        if n_out == n_in:
            src = np.arange(n_out)
        elif n_out == 2 * n_in:
            src = np.arange(n_out) >> 1
        r[np.arange(n_out), src] = 1.0
        return r
    if mode != "bilinear":
        raise ValueError(f"unknown resize mode {mode!r}")
    # PyTorch's _compute_indices_weights_aa with the triangle filter (interp_size 2)
    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(n_out):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), n_in)
        j = np.arange(xmin, xmax)
        wts = np.maximum(0.0, 1.0 - np.abs((j - center + 0.5) * invscale))
        total = wts.sum()
        r[i, j] = wts / total if total > 0 else 0.0
    return r


def resize_matrices(in_hw, out_hw, mode: str):
    """(R_h, R_w) for resizing (h, w) to (H, W); identities when the size does not change."""
    (h, w), (hh, ww) = in_hw, out_hw
    return interp_matrix(h, hh, mode), interp_matrix(w, ww, mode)


def resize(x, rh, rw):
    """z = R_h x R_w^T on each channel of x (..., h, w, C); works on numpy and JAX arrays."""
    import jax.numpy as jnp

    xp = jnp if not isinstance(x, np.ndarray) else np
    return xp.einsum("ia,...abc,jb->...ijc", rh.astype(x.dtype), x, rw.astype(x.dtype))


def grid_corners(height: int, width: int, patch: int, stride: int, num: int) -> np.ndarray:
    """int (P, 2) top-left corners of the dense grid in the reference's order: ``unfold`` over rows,
    then columns, flattened row-major, truncated to the first ``num`` (``PatchModel.get_patches``)."""
    rows = np.arange(0, height - patch + 1, stride)
    cols = np.arange(0, width - patch + 1, stride)
    corners = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(-1, 2)
    return corners[:num]


def random_corners(key, height: int, width: int, patch: int, num: int):
    """int32 (P, 2) corners drawn uniformly from [0, H - p) x [0, W - p), the reference's
    ``np.random.randint(0, h - p)`` range (the last offset is never drawn; with H = p only 0)."""
    import jax

    hi = np.array([max(height - patch, 1), max(width - patch, 1)], np.int32)
    return jax.random.randint(key, (num, 2), 0, hi, dtype=np.int32)


def coverage(corners, height: int, width: int, patch: int) -> np.ndarray:
    """int (H, W): c[i, j] = number of patches (corners (P, 2)) that contain pixel (i, j)."""
    c = np.zeros((height, width), np.int64)
    for r, s in np.asarray(corners):
        c[r:r + patch, s:s + patch] += 1
    return c


def _product_factors(c):
    """(c_r, c_c) with c = outer(c_r, c_c) exactly, or None."""
    c = np.asarray(c, np.int64)
    i, j = np.unravel_index(np.argmax(c), c.shape)
    if c[i, j] == 0 or not np.array_equal(np.outer(c[:, j], c[i, :]), c * c[i, j]):  # exact, in integers
        return None
    return c[:, j] / np.sqrt(c[i, j]), c[i, :] / np.sqrt(c[i, j])


def _lmax(m):
    return float(np.linalg.eigvalsh(m)[-1])


def weighted_norm(rh, rw, c) -> float:
    """sqrt(lambda_max(U^T diag(c) U)) for U = R_h (x) R_w and weights c (H, W) >= 0, rounded up.

    Exact (up to NORM_MARGIN) when c is a product of row and column weights or the image has at
    most DENSE_PIXELS pixels; otherwise the upper bound sqrt(max c) ||R_h|| ||R_w||.
    """
    f = _product_factors(c)
    c = np.asarray(c, np.float64)
    if not np.any(c > 0):
        return 0.0
    if f is not None:  # U^T diag(c_r (x) c_c) U = (R_h^T diag c_r R_h) (x) (R_w^T diag c_c R_w)
        lam = _lmax(rh.T @ (f[0][:, None] * rh)) * _lmax(rw.T @ (f[1][:, None] * rw))
    elif rh.shape[1] * rw.shape[1] <= DENSE_PIXELS:
        u = np.kron(rh, rw)  # (H W, h w), row-major pixels on both sides
        lam = _lmax(u.T @ (c.reshape(-1)[:, None] * u))
    else:
        lam = c.max() * _lmax(rh.T @ rh) * _lmax(rw.T @ rw)
    return float(np.sqrt(max(lam, 0.0)) * (1.0 + NORM_MARGIN))


def op_norm(r) -> float:
    """||R||_2 (largest singular value), rounded up by NORM_MARGIN."""
    return float(np.linalg.norm(r, 2) * (1.0 + NORM_MARGIN))
