"""QCRS (Kung & Chen, AAAI 2024): per-input sigma maximising the certified radius, found by a
vectorised quasiconcave search (reference code: ntuaislab/QCRS ``code/core_qcrs.py``).

At a fixed input x the estimated radius curve

    R_x(sigma) = sigma * Phi^{-1}(pL(sigma)),   pL = Clopper-Pearson lower bound (alpha_s = 0.001)
                                                 of the count of c_A among n draws at sigma

is taken to be quasiconcave (unimodal) on [left, right]; QCRS returns a sigma within epsilon of
its maximiser, keeps it only if a fresh check says it beats sigma0, and then runs Cohen CERTIFY
at that sigma with fresh noise.

Two searches, both through the on-device sampler and vectorised over a batch of images:

``grid`` (default, this library's): per round, C candidate sigmas evenly spaced on the current
bracket [L, U] (endpoints included) are evaluated for every image in ONE sampler call
(images x candidates x draws, common random numbers across the candidates of an image). With
k = argmax_j R_hat(sigma_j) (first on ties, i.e. the smaller sigma) the new bracket is
[sigma_{k-1}, sigma_{k+1}]: under quasiconcavity the maximiser lies there. The width shrinks by
a factor 2/(C-1) per round (C = 16: 7.5x), so R = the least rounds with
(right - left) * (2/(C-1))^R <= epsilon. The answer is the best candidate of the last round,
within (bracket width)/2 <= epsilon/2 of the maximiser - the reference's accuracy (it returns the
midpoint of a bracket of width <= epsilon). The draws per candidate are set so that the search
uses no more samples than the reference's bisection:

    n_c = floor(2 n S_ref / (R C)),   S_ref = the reference's number of slope evaluations
                                      = 1 + #halvings from (right-left)/2 down to <= epsilon.

``bisection`` (ntuaislab/QCRS ``code/core_qcrs.py``, ``binary_search_bisection``, followed
exactly): one finite-difference slope R(sigma+h) - R(sigma-h) (h = epsilon/epsilon_step, n fresh
draws on each side, each side's radius 0 if its own argmax is not c_A) per sequential step, the
bracket halved by its sign. A zero slope moves down at the first step; later it reverses the last
move (down after an upward move, up after a downward one) and records that move as the last
one, as the reference's direction variable does; on a classifier whose slopes are all zero the
search therefore zig-zags (on [0.12, 1.7] with epsilon 0.03 it ends at 0.6508). sigma - h < 0 is
evaluated as in the reference.

Both: c_A = argmax of n draws at sigma0 first; after the search the safety check runs
FAST_CERTIFY (CP lower bound with n draws) at sigma0 and at sigma* with fresh ``check`` draws and
keeps sigma* only if its radius is strictly larger (else sigma0). Two rules
(``--qcrs-check-rule``):

- ``rsjax`` (default): common draws at sigma0 and sigma* (a paired comparison), and a side whose
  own argmax is not c_A counts as radius 0, as in the slopes. This is the sounder rule: the
  reference's lets the check switch to a sigma at which the smoothed classifier predicts another
  class than the one the search was run for, on the strength of that other class's radius.
- ``reference``: the reference's ``fast_certify`` exactly: independent draws at each side and
  each side's own argmax (its radius whatever class it predicts), for reproducing its numbers.

Neither rule affects soundness of the final certificate, which uses fresh draws.

Draws per image (n = --gradient_n): selection n, search 2 n S_ref (bisection) or R C n_c <=
2 n S_ref (grid), check 2 n.

Search budget (``--qcrs-budget B``, draws per image for selection + search + check, every
noisy forward pass counted, i.e. a round of C candidates x n_c draws costs C n_c). ``reference``
(default) is the reference's total B_ref = n (3 + 2 S_ref). Otherwise B is a number of draws or
a percentage of the certificate's --N ("3%" = floor(0.03 N)), and it is split in the reference's
proportions, i.e. the plan is the reference's at the effective

    n_B = floor(B / (3 + 2 S_ref))                   (replaces n = --gradient_n)
    selection n_B,  check 2 n_B (n_B at sigma0 and at sigma*, common draws),
    grid: n_c = floor((B - 3 n_B) / (R C)) draws per candidate per round (R, C as above),
    bisection: 2 n_B per slope (S_ref slopes),

so the draws used are 3 n_B + R C n_c <= B (grid) and n_B (3 + 2 S_ref) <= B (bisection), and
B = B_ref gives back n_B = n and the reference plan exactly. The sampler call structure is
unchanged (one call per round: images x candidates x draws). With B << B_ref the grid's
candidates see few draws each; because the C candidates of an image share their draws (common
random numbers) their comparison is paired, so the argmax stays stable, but the curve being
maximised is the CP curve at n_c draws, whose maximiser can differ from the one at n draws
(a smaller n_c caps Phi^{-1}(pL) lower, which moves the maximiser, usually to larger sigma).
E.g. CIFAR sigma 0.25 settings (S_ref 5, R 2, C 16), B = 3000 = 3% of N = 100,000: n_B = 230,
selection 230 + check 460 + grid 2 x 16 x 72 = 2994 draws (reference: 6,500). Noise purposes: selection and search use the ``search`` stream
(sub-streams 0, 1, 2, ...), the check the ``check`` stream; the final certificate uses only
``select``/``estimate``, so none of the search's draws is reused (sample splitting).

Options (:class:`QCRSConfig`; reference-compatible names, same meaning): --epsilon, --left,
--right, --epsilon_step, --gradient_n; sigma0 is the certify command's SIGMA. Extra: --qcrs-budget
{reference,DRAWS,PCT%}, --qcrs-search {grid,bisection}, --qcrs-candidates C, --qcrs-alpha (search
CP alpha, 0.001 as hard-coded in the reference), --qcrs-no-check, --qcrs-check-rule
{rsjax,reference}, --qcrs-memory (DDRS-style memory check, guarantee ``memory``).
Output extras: best_sigma and pABar (the reference's name for the final certificate's pA_lower,
also in the pA_lower column; filled by the chooser's ``finish``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rsjax.config import option
from rsjax.core.batching import DEFAULT_BATCH_SIZE
from rsjax.errors import RsjaxError, check_count, check_positive
from rsjax.methods import Method, register
from rsjax.methods._common import (
    candidate_counter,
    class_counts,
    estimated_radius,
    memory_factory,
    method_keys,
    round_keys,
    unpack,
)

CHECK_RULES = ("rsjax", "reference")


@dataclasses.dataclass(frozen=True)
class QCRSConfig:
    """QCRS's options (flags and recorded settings come from these fields; module doc)."""

    epsilon: float = option(0.001, "search tolerance on sigma (reference default 0.001)")
    left: float = option(0.07, "lower end of the sigma search interval")
    right: float = option(0.36, "upper end of the sigma search interval")
    epsilon_step: float = option(2.0, "finite-difference step h = epsilon / epsilon_step (bisection search)",
                                 flag="--epsilon_step")
    gradient_n: int = option(500, "draws per evaluation of the reference (selection, each slope side, check)",
                             flag="--gradient_n")
    qcrs_budget: str = option("reference", "total search draws per image (selection + search + check): "
                              "'reference' (the reference's n (3 + 2 S_ref) with n = --gradient_n), a number of "
                              "draws, or a percentage of --N such as 3%%; split in the reference's proportions",
                              metavar="reference|DRAWS|PCT%")
    qcrs_search: str = option("grid", "grid: vectorised C-candidate search; bisection: the reference's",
                              choices=("grid", "bisection"))
    qcrs_candidates: int = option(16, "candidates per grid round (C)")
    qcrs_alpha: float = option(0.001, "Clopper-Pearson alpha inside the search")
    qcrs_no_check: bool = option(False, "skip the safety check against sigma0")
    qcrs_check_rule: str = option("rsjax", "safety check: rsjax (common draws, c_A only) or reference "
                                  "(independent draws, each side's own argmax)", choices=CHECK_RULES)
    qcrs_memory: bool = option(False, "memory-based consistency check (DDRS memory-based certification) over the certified balls")

    def __post_init__(self):
        self.plan(validate_only=True)

    def plan(self, n=None, *, validate_only=False):
        """The search plan (:class:`QCRSPlan`) with the budget resolved against the certificate's
        ``n`` (needed only for a percentage budget)."""
        budget = parse_budget(self.qcrs_budget, n, resolve=not validate_only)
        return QCRSPlan(epsilon=self.epsilon, left=self.left, right=self.right, epsilon_step=self.epsilon_step,
                        gradient_n=self.gradient_n, alpha=self.qcrs_alpha, candidates=self.qcrs_candidates,
                        search=self.qcrs_search, check=not self.qcrs_no_check, check_rule=self.qcrs_check_rule,
                        budget=budget).validate()


@dataclasses.dataclass(frozen=True)
class QCRSPlan:
    """The resolved search settings the algorithm runs with (``budget``: draws per image or None)."""

    epsilon: float = 0.001
    left: float = 0.07
    right: float = 0.36
    epsilon_step: float = 2.0
    gradient_n: int = 500
    alpha: float = 0.001
    candidates: int = 16
    search: str = "grid"
    check: bool = True
    check_rule: str = "rsjax"
    budget: int | None = None  # total search draws per image; None: the reference's (see module doc)

    def validate(self):
        for name, v in (("--epsilon", self.epsilon), ("--left", self.left), ("--right", self.right),
                        ("--epsilon_step", self.epsilon_step)):
            if not np.isfinite(v):
                raise RsjaxError(f"{name} must be a finite number, got {v}")
        check_positive("--epsilon", self.epsilon)
        check_positive("--epsilon_step", self.epsilon_step)
        check_count("--gradient_n", self.gradient_n)
        check_positive("--left", self.left)  # every candidate must be a valid noise level
        if not (self.right > self.left):
            raise RsjaxError(f"--right ({self.right}) must be larger than --left ({self.left})")
        if not (0.0 < self.alpha < 1.0):
            raise RsjaxError(f"--qcrs-alpha must be in (0, 1), got {self.alpha}")
        if self.check_rule not in CHECK_RULES:
            raise RsjaxError(f"--qcrs-check-rule must be one of {', '.join(CHECK_RULES)}, got {self.check_rule!r}")
        if self.search not in ("grid", "bisection"):
            raise RsjaxError(f"--qcrs-search must be grid or bisection, got {self.search!r}")
        if int(self.candidates) != self.candidates or self.candidates < 4:
            raise RsjaxError(f"--qcrs-candidates must be an integer >= 4, got {self.candidates}")
        if self.budget is not None:
            if int(self.budget) != self.budget or self.budget < 1:
                raise RsjaxError(f"--qcrs-budget must be a positive number of draws, got {self.budget}")
            need = minimum_budget(self)
            if self.budget < need:
                raise RsjaxError(f"--qcrs-budget {self.budget} draws is too small: this search needs at least "
                                 f"{need} (1 draw per selection/check evaluation and per candidate)")
        return self

    @property
    def h(self):
        return self.epsilon / self.epsilon_step


def reference_slopes(left, right, epsilon) -> int:
    """S_ref: slope evaluations of the reference bisection (first at the midpoint, then one per
    halving while U - L > epsilon)."""
    width = (right - left) / 2.0
    slopes = 1
    while width > epsilon:
        width /= 2.0
        slopes += 1
    return slopes


def grid_rounds(cfg: QCRSPlan) -> int:
    """R: the least rounds with (right - left) (2/(C-1))^R <= epsilon (at least 1)."""
    C = int(cfg.candidates)
    width = cfg.right - cfg.left
    rounds = 0
    while width > cfg.epsilon:
        width *= 2.0 / (C - 1)
        rounds += 1
    return max(rounds, 1)


def reference_budget(cfg: QCRSPlan) -> int:
    """B_ref = n (3 + 2 S_ref): the reference's draws per image (selection, slopes, check)."""
    return cfg.gradient_n * (3 + 2 * reference_slopes(cfg.left, cfg.right, cfg.epsilon))


def effective_n(cfg: QCRSPlan) -> int:
    """n_B: draws per selection / check evaluation (and per slope side of the bisection).

    --gradient_n without a budget; floor(B / (3 + 2 S_ref)) with a budget B (module doc)."""
    if cfg.budget is None:
        return int(cfg.gradient_n)
    return int(cfg.budget) // (3 + 2 * reference_slopes(cfg.left, cfg.right, cfg.epsilon))


def minimum_budget(cfg: QCRSPlan) -> int:
    """Least B with n_B >= 1 and (grid) n_c >= 1."""
    base = 3 + 2 * reference_slopes(cfg.left, cfg.right, cfg.epsilon)
    if cfg.search == "grid":
        return max(base, 3 + grid_rounds(cfg) * int(cfg.candidates))
    return base


def plan_grid(cfg: QCRSPlan):
    """(rounds R, draws per candidate n_c) of the grid search for ``cfg`` (see module doc):
    n_c = floor(2 n S_ref / (R C)) (reference budget) or floor((B - 3 n_B) / (R C)) (budget B)."""
    C = int(cfg.candidates)
    rounds = grid_rounds(cfg)
    if cfg.budget is None:
        grid = 2 * cfg.gradient_n * reference_slopes(cfg.left, cfg.right, cfg.epsilon)
    else:
        grid = int(cfg.budget) - 3 * effective_n(cfg)
    n_c = grid // (rounds * C)
    if n_c < 1:
        what = f"--gradient_n {cfg.gradient_n}" if cfg.budget is None else f"--qcrs-budget {cfg.budget}"
        raise RsjaxError(f"{what} is too small for {C} candidates x {rounds} rounds")
    return rounds, int(n_c)


PCT_SLACK = 1e-9  # floor(pct / 100 * N) of a percentage that should be whole (3% of 100,000 -> 3000, not 2999)


def parse_budget(text, N=None, *, resolve=True):
    """--qcrs-budget value -> draws per image (int) or None for ``reference``.

    Forms: ``reference``; a positive integer number of draws (``3000``); a percentage of the
    certificate's N (``3%`` -> floor(0.03 N)). With ``resolve=False`` a percentage is only checked
    (and gives None), for validating a config before N is known."""
    if text is None:
        return None
    if not isinstance(text, str):
        v = float(text)
        if v != int(v) or v < 1:
            raise RsjaxError(f"--qcrs-budget must be 'reference', a positive whole number of draws or a percentage of --N like 3%, got {text!r}")
        return int(v)
    t = text.strip().lower()
    if t == "reference":
        return None
    bad = (f"--qcrs-budget must be 'reference', a positive whole number of draws or a percentage of --N "
           f"like 3%, got {text!r}")
    if t.endswith("%"):
        try:
            pct = float(t[:-1])
        except ValueError:
            raise RsjaxError(bad) from None
        if not (0.0 < pct <= 100.0) or not np.isfinite(pct):
            raise RsjaxError(f"--qcrs-budget percentage must be in (0, 100], got {text!r}")
        if not resolve:
            return None
        if N is None:
            raise RsjaxError(f"--qcrs-budget {text} needs --N (the certificate's draws) to be known")
        draws = int(np.floor(pct / 100.0 * int(N) + PCT_SLACK))
        if draws < 1:
            raise RsjaxError(f"--qcrs-budget {text} of N = {N} is less than one draw")
        return draws
    try:
        v = float(t)
    except ValueError:
        raise RsjaxError(bad) from None
    if not np.isfinite(v) or v != int(v) or v < 1:
        raise RsjaxError(bad)
    return int(v)


def search_draws(cfg: QCRSPlan) -> dict:
    """Draws per image of each phase (selection, search, check) and sequential sampler rounds."""
    n = effective_n(cfg)
    if cfg.search == "grid":
        rounds, n_c = plan_grid(cfg)
        search, seq = rounds * cfg.candidates * n_c, rounds
    else:
        slopes = reference_slopes(cfg.left, cfg.right, cfg.epsilon)
        search, seq = 2 * n * slopes, slopes
    check = 2 * n if cfg.check else 0
    return {"select": n, "search": search, "check": check, "total": n + search + check,
            "search_rounds": seq, "sequential_calls": 1 + seq + (1 if cfg.check else 0),
            "budget": reference_budget(cfg) if cfg.budget is None else int(cfg.budget)}


class QCRS:
    """The QCRS sigma chooser for a batch of images (host loop over rounds, device sampling).

    ``choose(x, sigma0, search_keys, check_keys) -> (sigma, info)``; ``info`` has
    ``search_sigma`` (before the check), ``cA`` and the bracket history for tests.
    """

    def __init__(self, classifier, cfg: QCRSPlan, batch_size: int = DEFAULT_BATCH_SIZE):
        self.cfg = cfg.validate()
        self.counter = candidate_counter(classifier, batch_size)

    # --- phases -------------------------------------------------------------------------------
    def select_class(self, x, sigma0, keys):
        counts = self.counter.candidates(x, np.asarray(sigma0)[:, None], round_keys(keys, 0), effective_n(self.cfg))
        return np.argmax(class_counts(counts[:, 0]), axis=-1)

    def grid_search(self, x, cA, keys):
        cfg = self.cfg
        m = x.shape[0]
        rounds, n_c = plan_grid(cfg)
        C = cfg.candidates
        L = np.full(m, cfg.left, np.float64)
        U = np.full(m, cfg.right, np.float64)
        t = np.linspace(0.0, 1.0, C)
        best = np.zeros(m)
        history = []
        for r in range(rounds):
            sig = L[:, None] + (U - L)[:, None] * t[None, :]  # (M, C)
            counts = self.counter.candidates(x, sig, round_keys(keys, r + 1), n_c)
            rad, _ = estimated_radius(counts, cA[:, None], sig, cfg.alpha)
            k = np.argmax(rad, axis=1)  # first maximum: the smaller sigma on ties
            rows = np.arange(m)
            best = sig[rows, k]
            L = sig[rows, np.maximum(k - 1, 0)]
            U = sig[rows, np.minimum(k + 1, C - 1)]
            history.append((L.copy(), U.copy()))
        return best, history

    def bisection(self, x, cA, keys):
        """The reference's ``binary_search_bisection`` (ntuaislab/QCRS ``code/core_qcrs.py``),
        vectorised over images only.

        Every image's bracket halves at each step, so all images take the same S_ref steps. The
        direction is the reference's: a positive slope moves up, a negative one down; a zero slope
        moves down at the first step and afterwards reverses the last move; every move, a zero
        slope's included, becomes the last move.
        """
        import jax.numpy as jnp

        cfg = self.cfg
        m = x.shape[0]
        n, h = effective_n(cfg), cfg.h
        L = np.full(m, cfg.left, np.float64)
        U = np.full(m, cfg.right, np.float64)
        last = np.zeros(m, np.int8)  # 0: no move recorded, +1 / -1: last recorded move
        history = []
        for s in range(reference_slopes(cfg.left, cfg.right, cfg.epsilon)):
            mid = (L + U) / 2.0
            sig = np.stack([mid - h, mid + h], axis=1)  # (M, 2)
            # independent fresh draws on each side, as in the reference; one sampler call
            side_keys = jnp.stack([round_keys(keys, 2 * s + 1), round_keys(keys, 2 * s + 2)], axis=1)
            counts = self.counter.candidates(x, sig, side_keys, n)
            rad, _ = estimated_radius(counts, cA[:, None], sig, cfg.alpha)
            slope = rad[:, 1] - rad[:, 0]
            up = (slope > 0) | ((slope == 0) & (last == -1))  # last == 0 (first step): down
            L = np.where(up, mid, L)
            U = np.where(up, U, mid)
            last = np.where(up, 1, -1).astype(np.int8)
            history.append((L.copy(), U.copy()))
        return (L + U) / 2.0, history

    def safety_check(self, x, sigma0, sigma_star, keys, cA):
        """FAST_CERTIFY at sigma0 and sigma* with n fresh 'check' draws; keep sigma* only where its
        radius is strictly larger (module doc). Rule ``rsjax``: common draws, and a side whose own
        argmax is not c_A counts as radius 0, as in the slopes (the check never switches to a
        sigma at which the smoothed classifier predicts another class). Rule ``reference``:
        independent draws per side, each side's radius for its own argmax."""
        import jax.numpy as jnp

        sig = np.stack([sigma0, sigma_star], axis=1)
        n = effective_n(self.cfg)
        if self.cfg.check_rule == "reference":
            side_keys = jnp.stack([round_keys(keys, 1), round_keys(keys, 2)], axis=1)
            counts = self.counter.candidates(x, sig, side_keys, n)
            own = np.argmax(class_counts(counts), axis=-1)
            rad, _ = estimated_radius(counts, own, sig, self.cfg.alpha)
        else:
            counts = self.counter.candidates(x, sig, round_keys(keys, 0), n)
            rad, _ = estimated_radius(counts, cA[:, None], sig, self.cfg.alpha)
        return np.where(rad[:, 1] > rad[:, 0], sigma_star, sigma0), rad

    def choose(self, x, sigma0, search_keys, check_keys):
        x = np.asarray(x, np.float32)
        sigma0 = np.broadcast_to(np.asarray(sigma0, np.float64), (x.shape[0],)).copy()
        cA = self.select_class(x, sigma0, search_keys)
        if self.cfg.search == "grid":
            sigma_star, history = self.grid_search(x, cA, search_keys)
        else:
            sigma_star, history = self.bisection(x, cA, search_keys)
        info = {"search_sigma": sigma_star, "cA": cA, "history": history}
        if self.cfg.check:
            sigma, rad = self.safety_check(x, sigma0, sigma_star, check_keys, cA)
            info["check_radius"] = rad
        else:
            sigma = sigma_star
        return sigma, info


# --- the method ----------------------------------------------------------------------------------
def build(cfg: QCRSConfig, classifier, *, seed, batch_size=DEFAULT_BATCH_SIZE, n=None):
    """chooser(x, idx, sigma0) -> (sigma, {'best_sigma': sigma}); ``n``: the certificate's N
    (resolves a percentage --qcrs-budget). ``chooser.finish`` adds ``pABar`` after CERTIFY."""
    unpack(classifier)
    qcrs = QCRS(classifier, cfg.plan(n), batch_size)

    def chooser(x, idx, sigma0):
        sigma, _ = qcrs.choose(x, sigma0, method_keys(seed, idx, "search"), method_keys(seed, idx, "check"))
        return sigma, {"best_sigma": sigma}

    def finish(extras, *, predict, radius, pA_lower):
        return {**extras, "pABar": np.asarray(pA_lower)}

    chooser.qcrs, chooser.finish = qcrs, finish
    return chooser


METHOD = register(Method(
    name="qcrs",
    guarantee="per-input",
    config=QCRSConfig,
    build=build,
    memory=memory_factory("qcrs_memory"),
    extra_columns=("best_sigma", "pABar"),
))
