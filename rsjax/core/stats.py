"""Host-side statistics of Cohen et al. (2019) CERTIFY and PREDICT (their section 3.2
pseudocode; locuslab/smoothing ``code/core.py``).

Everything here works on the per-image integer counts that the on-device sampler returns
and goes through ``scipy.stats``; nothing is hand-written.

- Clopper-Pearson one-sided (1 - alpha) lower confidence bound on p_A from n_A successes in n
  trials (what Cohen's ``proportion_confint(nA, n, alpha=2*alpha, method="beta")[0]`` returns):

      pA_lower = Beta^{-1}(alpha; n_A, n - n_A + 1),   pA_lower = 0 when n_A = 0.

  For n_A = n it is alpha^(1/n), the largest value n draws can certify.
- Cohen radius: R = sigma * Phi^{-1}(pA_lower) (valid when pA_lower > 1/2).
- PREDICT's test: two-sided exact binomial test of n1 successes in n1 + n2 trials at p = 1/2
  (``scipy.stats.binomtest(n1, n1 + n2, 0.5).pvalue``).
"""

from __future__ import annotations

import numpy as np
from scipy import stats

ABSTAIN = -1


def clopper_pearson_lower(nA, n, alpha):
    """One-sided (1 - alpha) Clopper-Pearson lower bound Beta^{-1}(alpha; nA, n - nA + 1).

    ``nA`` and ``n`` broadcast (int arrays or scalars); ``nA = 0`` gives 0 (the Beta quantile
    is undefined there). Returns float64 of the broadcast shape (a Python float for scalars).
    """
    nA, n = np.broadcast_arrays(np.asarray(nA, dtype=np.int64), np.asarray(n, dtype=np.int64))
    if np.any(nA < 0) or np.any(nA > n):
        raise ValueError("need 0 <= nA <= n")
    out = np.zeros(nA.shape, dtype=np.float64)
    pos = nA > 0
    out[pos] = stats.beta.ppf(alpha, nA[pos], n[pos] - nA[pos] + 1)
    return float(out) if out.ndim == 0 else out


def cohen_radius(pA_lower, sigma):
    """R = sigma * Phi^{-1}(pA_lower): the certified L2 radius when pA_lower > 1/2."""
    return np.asarray(sigma, dtype=np.float64) * stats.norm.ppf(np.asarray(pA_lower, dtype=np.float64))


def certify_from_counts(counts0, counts1, sigma, alpha, n=None):
    """CERTIFY steps 1, 3 and 4 given the selection and estimation counts.

    Args:
      counts0: int (M, K) counts of the n0 selection draws; c_A = argmax (first index on ties).
      counts1: int (M, K) counts of the n independent estimation draws; n_A = counts1[c_A].
      sigma: float scalar or (M,) noise level of each image.
      alpha: failure probability.
      n: the number of estimation draws (default ``counts1.sum(axis=1)``); draws that are no vote
        for any class (non-finite logits) count among the n trials and against c_A.

    Returns ``(prediction int64[M], radius float64[M], pA_lower float64[M])``:
    prediction c_A and radius sigma * Phi^{-1}(pA_lower) if pA_lower >= 1/2 (Cohen's test is
    ``pA_lower < 0.5`` -> abstain), else prediction -1 and radius 0.
    """
    counts0 = np.asarray(counts0)
    counts1 = np.asarray(counts1)
    cA = np.argmax(counts0, axis=1)
    nA = np.take_along_axis(counts1, cA[:, None], axis=1)[:, 0]
    n = counts1.sum(axis=1) if n is None else np.broadcast_to(np.asarray(n, np.int64), nA.shape)
    pA_lower = np.atleast_1d(clopper_pearson_lower(nA, n, alpha))
    sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64), pA_lower.shape)
    ok = pA_lower >= 0.5
    prediction = np.where(ok, cA, ABSTAIN).astype(np.int64)
    radius = np.where(ok, cohen_radius(np.where(ok, pA_lower, 0.5), sigma), 0.0)
    return prediction, radius, pA_lower


def binomial_pvalue(n1, n2):
    """Two-sided exact binomial test p-value of n1 successes in n1 + n2 trials at p = 1/2
    (1.0 when n1 + n2 = 0). Vectorised over equal-shape int arrays."""
    n1 = np.asarray(n1, dtype=np.int64)
    n2 = np.asarray(n2, dtype=np.int64)
    out = np.ones(np.broadcast(n1, n2).shape, dtype=np.float64)
    for i in np.ndindex(out.shape):
        k, m = int(n1[i] if n1.ndim else n1), int(n2[i] if n2.ndim else n2)
        if k + m > 0:
            out[i] = stats.binomtest(k, k + m, 0.5).pvalue
    return float(out) if out.ndim == 0 else out


def predict_from_counts(counts, alpha):
    """PREDICT given the n draws' counts (M, K): c1 = argmax, c2 = the runner-up;
    return c1 where binomtest(n1, n1 + n2, 1/2).pvalue <= alpha, else -1 (abstain).

    Returns ``(prediction int64[M], pvalue float64[M])``.
    """
    counts = np.asarray(counts)
    c1 = np.argmax(counts, axis=1)
    n1 = np.take_along_axis(counts, c1[:, None], axis=1)[:, 0]
    rest = counts.copy()
    np.put_along_axis(rest, c1[:, None], -1, axis=1)
    n2 = rest.max(axis=1) if counts.shape[1] > 1 else np.zeros_like(n1)
    n2 = np.maximum(n2, 0)
    pvalue = np.atleast_1d(binomial_pvalue(n1, n2))
    prediction = np.where(pvalue <= alpha, c1, ABSTAIN).astype(np.int64)
    return prediction, pvalue
