"""QCRS (Kung & Chen, AAAI 2024): per-input sigma maximising the certified radius, found by a
vectorised quasiconcave search (spec section 5).

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

``bisection`` (the reference's ``binary_search_bisection``, section 5.2, for comparison): one
finite-difference slope R(sigma+h) - R(sigma-h) (h = epsilon/epsilon_step, n fresh draws on each
side, each side's radius 0 if its own argmax is not c_A) per sequential step, bracket halved by
its sign (slope 0: move toward the smaller sigma unless the last move was downward - the
reference's rule). sigma - h < 0 is evaluated as in the reference.

Both: c_A = argmax of n draws at sigma0 first; after the search the safety check runs
FAST_CERTIFY (CP lower bound with n draws) at sigma0 and at sigma* with fresh ``check`` draws and
keeps sigma* only if its radius is strictly larger (else sigma0). A side whose own argmax is not
c_A counts as radius 0 there too [D: the spec's FAST_CERTIFY uses its own argmax; without this a
search interval where the smoothed classifier flips to another class would pass the check with
that class's radius].

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

Command line (reference-compatible names, same meaning): --epsilon, --left, --right,
--epsilon_step, --gradient_n; sigma0 is the certify command's SIGMA. Extra: --qcrs-budget
{reference,DRAWS,PCT%}, --qcrs-search {grid,bisection}, --qcrs-candidates C, --qcrs-alpha (search CP alpha, 0.001 as hard-coded in the
reference), --qcrs-no-check, --qcrs-memory (DDRS-style memory check, guarantee ``memory``).
Output extras: best_sigma and pABar (the reference's name for the final certificate's pA_lower, also in the pA_lower column).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rsjax.errors import RsjaxError, check_count, check_positive
from rsjax.methods import Method, register
from rsjax.methods._common import (
    CandidateCounter,
    batch_size_of,
    estimated_radius,
    memory_factory,
    method_keys,
    num_classes_of,
    round_keys,
)


@dataclasses.dataclass(frozen=True)
class QCRSConfig:
    epsilon: float = 0.001
    left: float = 0.07
    right: float = 0.36
    epsilon_step: float = 2.0
    gradient_n: int = 500
    alpha: float = 0.001
    candidates: int = 16
    search: str = "grid"
    check: bool = True
    budget: int | None = None  # total search draws per image; None: the reference's (see module doc)

    def validate(self):
        check_positive("--epsilon", self.epsilon)
        check_positive("--epsilon_step", self.epsilon_step)
        check_count("--gradient_n", self.gradient_n)
        check_positive("--left", self.left)  # every candidate must be a valid noise level
        if not (self.right > self.left):
            raise RsjaxError(f"--right ({self.right}) must be larger than --left ({self.left})")
        if not (0.0 < self.alpha < 1.0):
            raise RsjaxError(f"--qcrs-alpha must be in (0, 1), got {self.alpha}")
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


def grid_rounds(cfg: QCRSConfig) -> int:
    """R: the least rounds with (right - left) (2/(C-1))^R <= epsilon (at least 1)."""
    C = int(cfg.candidates)
    width = cfg.right - cfg.left
    rounds = 0
    while width > cfg.epsilon:
        width *= 2.0 / (C - 1)
        rounds += 1
    return max(rounds, 1)


def reference_budget(cfg: QCRSConfig) -> int:
    """B_ref = n (3 + 2 S_ref): the reference's draws per image (selection, slopes, check)."""
    return cfg.gradient_n * (3 + 2 * reference_slopes(cfg.left, cfg.right, cfg.epsilon))


def effective_n(cfg: QCRSConfig) -> int:
    """n_B: draws per selection / check evaluation (and per slope side of the bisection).

    --gradient_n without a budget; floor(B / (3 + 2 S_ref)) with a budget B (module doc)."""
    if cfg.budget is None:
        return int(cfg.gradient_n)
    return int(cfg.budget) // (3 + 2 * reference_slopes(cfg.left, cfg.right, cfg.epsilon))


def minimum_budget(cfg: QCRSConfig) -> int:
    """Least B with n_B >= 1 and (grid) n_c >= 1."""
    base = 3 + 2 * reference_slopes(cfg.left, cfg.right, cfg.epsilon)
    if cfg.search == "grid":
        return max(base, 3 + grid_rounds(cfg) * int(cfg.candidates))
    return base


def plan_grid(cfg: QCRSConfig):
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


def parse_budget(text, N=None):
    """--qcrs-budget value -> draws per image (int) or None for ``reference``.

    Forms: ``reference``; a positive integer number of draws (``3000``); a percentage of the
    certificate's N (``3%`` -> floor(0.03 N))."""
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
        if N is None:
            raise RsjaxError(f"--qcrs-budget {text} needs --N (the certificate's draws) to be known")
        draws = int(np.floor(pct / 100.0 * int(N) + 1e-9))
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


def search_draws(cfg: QCRSConfig) -> dict:
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

    def __init__(self, f, num_classes: int, cfg: QCRSConfig, batch_size: int = 1000):
        self.cfg = cfg.validate()
        self.counter = CandidateCounter(f, num_classes, batch_size)

    # --- phases -------------------------------------------------------------------------------
    def select_class(self, x, sigma0, keys):
        counts = self.counter(x, np.asarray(sigma0)[:, None], round_keys(keys, 0), effective_n(self.cfg))
        return np.argmax(counts[:, 0], axis=-1)

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
            counts = self.counter(x, sig, round_keys(keys, r + 1), n_c)
            rad, _ = estimated_radius(counts, cA[:, None], sig, cfg.alpha)
            k = np.argmax(rad, axis=1)  # first maximum: the smaller sigma on ties
            rows = np.arange(m)
            best = sig[rows, k]
            L = sig[rows, np.maximum(k - 1, 0)]
            U = sig[rows, np.minimum(k + 1, C - 1)]
            history.append((L.copy(), U.copy()))
        return best, history

    def bisection(self, x, cA, keys):
        """The reference's binary_search_bisection (spec 5.2), vectorised over images only.

        Every image's bracket halves at each step, so all images take the same S_ref steps.
        Direction bookkeeping [D where the spec is silent]: the first step records its move
        (a zero slope counts as a downward move); later steps record only non-zero slopes.
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
            counts = self.counter(x, sig, side_keys, n)
            rad, _ = estimated_radius(counts, cA[:, None], sig, cfg.alpha)
            slope = rad[:, 1] - rad[:, 0]
            if s == 0:
                up = slope > 0
            else:
                up = (slope > 0) | ((slope == 0) & (last == -1))
            L = np.where(up, mid, L)
            U = np.where(up, U, mid)
            if s == 0:
                last = np.where(up, 1, -1).astype(np.int8)
            else:
                last = np.where(slope > 0, 1, np.where(slope < 0, -1, last)).astype(np.int8)
            history.append((L.copy(), U.copy()))
        return (L + U) / 2.0, history

    def safety_check(self, x, sigma0, sigma_star, keys, cA):
        """FAST_CERTIFY at sigma0 and sigma* (n fresh 'check' draws, common to both); keep sigma*
        only where its radius is strictly larger. A side whose own argmax is not c_A counts as
        radius 0, as in the slopes [D: so the check can never switch to a sigma at which the
        smoothed classifier predicts another class than at sigma0]."""
        sig = np.stack([sigma0, sigma_star], axis=1)
        counts = self.counter(x, sig, round_keys(keys, 0), effective_n(self.cfg))
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


# --- command line -------------------------------------------------------------------------------
def add_arguments(parser):
    g = parser.add_argument_group("QCRS (--method qcrs)")
    d = QCRSConfig()
    g.add_argument("--epsilon", type=float, default=d.epsilon, help="search tolerance on sigma (reference default 0.001)")
    g.add_argument("--left", type=float, default=d.left, help="lower end of the sigma search interval")
    g.add_argument("--right", type=float, default=d.right, help="upper end of the sigma search interval")
    g.add_argument("--epsilon_step", type=float, default=d.epsilon_step,
                   help="finite-difference step h = epsilon / epsilon_step (bisection search)")
    g.add_argument("--gradient_n", type=int, default=d.gradient_n,
                   help="draws per evaluation of the reference (selection, each slope side, check)")
    g.add_argument("--qcrs-budget", default="reference", metavar="reference|DRAWS|PCT%",
                   help="total search draws per image (selection + search + check): 'reference' (default: "
                        "the reference's n (3 + 2 S_ref) with n = --gradient_n), a number of draws, or a "
                        "percentage of --N such as 3%%; split in the reference's proportions (module doc)")
    g.add_argument("--qcrs-search", choices=("grid", "bisection"), default=d.search,
                   help="grid: vectorised C-candidate search (default); bisection: the reference's")
    g.add_argument("--qcrs-candidates", type=int, default=d.candidates, help="candidates per grid round (C)")
    g.add_argument("--qcrs-alpha", type=float, default=d.alpha, help="Clopper-Pearson alpha inside the search")
    g.add_argument("--qcrs-no-check", action="store_true", help="skip the safety check against sigma0")
    g.add_argument("--qcrs-memory", action="store_true",
                   help="memory-based consistency check (DDRS section 4.3) over the certified balls")


def config_from_args(args) -> QCRSConfig:
    d = QCRSConfig()
    return QCRSConfig(
        epsilon=getattr(args, "epsilon", d.epsilon),
        left=getattr(args, "left", d.left),
        right=getattr(args, "right", d.right),
        epsilon_step=getattr(args, "epsilon_step", d.epsilon_step),
        gradient_n=getattr(args, "gradient_n", d.gradient_n),
        alpha=getattr(args, "qcrs_alpha", d.alpha),
        candidates=getattr(args, "qcrs_candidates", d.candidates),
        search=getattr(args, "qcrs_search", d.search),
        check=not getattr(args, "qcrs_no_check", False),
        budget=parse_budget(getattr(args, "qcrs_budget", None), getattr(args, "N", None)),
    ).validate()


def build(args, f, meta):
    """chooser(x, idx, sigma0) -> (sigma, {'best_sigma': sigma}) for the certify command."""
    cfg = config_from_args(args)
    shape = tuple((meta or {}).get("input_shape") or ())
    K = num_classes_of(f, meta, shape) if shape else int(meta["num_classes"])
    qcrs = QCRS(f, K, cfg, batch_size_of(args))
    seed = int(getattr(args, "seed", 0))

    def chooser(x, idx, sigma0):
        sigma, _ = qcrs.choose(x, sigma0, method_keys(seed, idx, "search"), method_keys(seed, idx, "check"))
        return sigma, {"best_sigma": sigma}

    chooser.qcrs = qcrs
    return chooser


METHOD = register(Method(
    name="qcrs",
    guarantee="per-input",
    add_arguments=add_arguments,
    build=build,
    memory=memory_factory("qcrs_memory"),
    extra_columns=("best_sigma", "pABar"),
    doc="QCRS: sigma maximising the estimated radius on [--left, --right] (vectorised quasiconcave search).",
))
