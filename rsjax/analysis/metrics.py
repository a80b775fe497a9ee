"""Metrics of certification outputs (spec sections 1.7 and 3.3).

Notation: a file has N rows i with ``correct_i`` in {0, 1} (1 iff the smoothed classifier
predicted the true label; abstains count as 0) and certified radius ``R_i`` >= 0.

- approximate certified accuracy  A(r) = (1/N) sum_i [correct_i = 1 and R_i >= r]
- clean accuracy of g              A(0) = (1/N) sum_i correct_i
- average certified radius        ACR = (1/N) sum_i correct_i * R_i  ( = integral_0^inf A(r) dr )
- abstain rate                     (1/N) sum_i [predict_i = -1]
- high-probability accuracy (Cohen et al.)
      A_hp(r) = A(r) - alpha - sqrt(alpha (1 - alpha) ln(1/rho) / N) - ln(1/rho) / (3N)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rsjax.errors import RsjaxError, check_alpha

from .results import Results


def _radii_array(radii) -> np.ndarray:
    return np.atleast_1d(np.asarray(radii, dtype=np.float64))


def certified_accuracy(res: Results, radii) -> np.ndarray:
    """Approximate certified accuracy A(r) = mean_i [correct_i = 1 and R_i >= r] at each r in
    ``radii`` (Cohen's ApproximateAccuracy). Abstains and wrong predictions count as failures,
    so A(0) is the smoothed classifier's clean accuracy. For a predict file (no radius) only
    r = 0 is defined; other radii give NaN."""
    radii = _radii_array(radii)
    if res.radius is None:
        return np.where(radii == 0, clean_accuracy(res), np.nan)
    certified = np.sort(res.radius[res.correct == 1])
    # number of correct rows with R_i >= r  =  len - (number with R_i < r)
    count = certified.size - np.searchsorted(certified, radii, side="left")
    return count / res.n


def clean_accuracy(res: Results) -> float:
    """Accuracy of the smoothed classifier g: mean_i correct_i (abstain = wrong)."""
    return float(res.correct.mean())


def acr(res: Results) -> float:
    """Average certified radius ACR = mean_i (correct_i * R_i); wrong and abstained rows count 0.
    NaN for a predict file."""
    if res.radius is None:
        return math.nan
    return float(np.mean(res.correct * res.radius))


def abstain_rate(res: Results) -> float:
    """Fraction of rows with predict = -1."""
    return float(np.mean(res.predict == -1))


def mean_time(res: Results) -> float:
    """Mean seconds per image (``time`` column), NaN if the file has none."""
    return math.nan if res.time is None else float(res.time.mean())


def high_prob_correction(alpha: float, rho: float, n: int) -> float:
    """The amount Cohen's HighProbAccuracy subtracts from A(r):
    alpha + sqrt(alpha (1 - alpha) ln(1/rho) / N) + ln(1/rho) / (3N).
    With probability >= 1 - rho over the certification randomness, the true certified accuracy
    (of a test set of N images each certified at level alpha) is at least A(r) minus this."""
    check_alpha(alpha)
    if not 0.0 < rho < 1.0:
        raise RsjaxError(f"rho must be in (0, 1), got {rho}")
    if n < 1:
        raise RsjaxError(f"N must be >= 1, got {n}")
    log_term = math.log(1.0 / rho)
    return alpha + math.sqrt(alpha * (1.0 - alpha) * log_term / n) + log_term / (3.0 * n)


def high_prob_accuracy(res: Results, radii, alpha: float, rho: float) -> np.ndarray:
    """Cohen's HighProbAccuracy(r) = A(r) - alpha - sqrt(alpha(1-alpha) ln(1/rho)/N) - ln(1/rho)/(3N),
    N = number of rows. Not clipped at 0 (as in the reference); a negative value is vacuous."""
    return certified_accuracy(res, radii) - high_prob_correction(alpha, rho, res.n)


def best_per_radius(acc: np.ndarray) -> np.ndarray:
    """Boolean mask (files x radii) of the best file at each radius: every file whose accuracy
    equals the column maximum. Cohen's tables mark ``argmax`` (the first of tied rows); here all
    tied rows are marked, and a column whose maximum is 0 (or NaN everywhere) is not marked.
    A single file is compared with nothing, so nothing is marked."""
    acc = np.asarray(acc, dtype=np.float64)
    if acc.shape[0] < 2:
        return np.zeros(acc.shape, bool)
    col_max = envelope(acc)
    return (acc == col_max[None, :]) & (col_max[None, :] > 0)


def envelope(acc: np.ndarray) -> np.ndarray:
    """Upper envelope over files: E(r) = max_files A_file(r) (NaN entries ignored)."""
    acc = np.asarray(acc, dtype=np.float64)
    return np.max(np.where(np.isnan(acc), -np.inf, acc), axis=0)


@dataclass
class Summary:
    """Metrics of several files at common radii (rows follow ``results``)."""

    results: list
    radii: np.ndarray
    accuracy: np.ndarray  # (files, radii): A(r)
    best: np.ndarray  # (files, radii) bool, see best_per_radius
    envelope: np.ndarray  # (radii,)
    clean: np.ndarray  # (files,)
    acr: np.ndarray  # (files,)
    abstain: np.ndarray  # (files,)
    seconds: np.ndarray  # (files,) mean time per image
    high_prob: np.ndarray | None = None  # (files, radii)
    alpha_rho: tuple | None = None

    @property
    def labels(self):
        return [r.label for r in self.results]


def summarize(results, radii, high_prob: tuple | None = None) -> Summary:
    """All metrics of ``results`` (a list of :class:`Results`) at ``radii``; ``high_prob`` =
    (alpha, rho) adds Cohen's HighProbAccuracy."""
    results = list(results)
    if not results:
        raise RsjaxError("no result files to summarize")
    radii = _radii_array(radii)
    acc = np.stack([certified_accuracy(r, radii) for r in results])
    hp = None
    if high_prob is not None:
        alpha, rho = high_prob
        hp = np.stack([high_prob_accuracy(r, radii, alpha, rho) for r in results])
    return Summary(
        results=results,
        radii=radii,
        accuracy=acc,
        best=best_per_radius(acc),
        envelope=envelope(acc),
        clean=np.array([clean_accuracy(r) for r in results]),
        acr=np.array([acr(r) for r in results]),
        abstain=np.array([abstain_rate(r) for r in results]),
        seconds=np.array([mean_time(r) for r in results]),
        high_prob=hp,
        alpha_rho=tuple(high_prob) if high_prob is not None else None,
    )


def max_radius(results) -> float:
    """Largest certified radius among correct rows of the files (0 if none)."""
    vals = [float(r.radius[r.correct == 1].max()) for r in results
            if r.radius is not None and (r.correct == 1).any()]
    return max(vals, default=0.0)


def radius_grid(max_r: float, step: float = 0.01) -> np.ndarray:
    """Radii 0, step, 2 step, ... <= max_r, rounded to 10 decimals so that grid points equal the
    decimal radii in the files (0.3 is 0.3, not 0.30000000000000004)."""
    if step <= 0:
        raise RsjaxError(f"radius step must be > 0, got {step}")
    k = int(math.floor(max_r / step + 1e-9))
    return np.round(np.arange(k + 1) * step, 10)


def default_table_radii(max_r: float) -> np.ndarray:
    """Table radii when none are given: 0 to ``max_r`` in steps of 0.25 (Cohen's CIFAR tables),
    or 0.5 / 1.0 when that would give more than 10 columns."""
    for step in (0.25, 0.5, 1.0):
        grid = radius_grid(max_r, step)
        if grid.size <= 10:
            return grid
    return radius_grid(max_r, math.ceil(max_r / 9))
