"""QCRS: the vectorised quasiconcave search against a closed-form radius curve and the
reference's bisection (spec section 5)."""

import numpy as np
import pytest

from rsjax.errors import RsjaxError
from rsjax.methods import get_method
from rsjax.methods._common import method_keys
from rsjax.methods.qcrs import (QCRS, QCRSConfig, QCRSPlan, effective_n, parse_budget, plan_grid, reference_budget,
                                reference_slopes, search_draws)
from tests._helpers_methods import (BOUNDARY, V0, META, halfspace, cp_radius_curve, images, build, slab, toy, slab_maximiser,
                                    slab_pA)


def test_reference_accounting_matches_the_spec_table():
    # spec 5.2: CIFAR sigma=0.5 README settings -> 5 loop iterations (6 slopes), 7,500 extra draws
    cfg = QCRSPlan(epsilon=0.03, left=0.12, right=1.7, epsilon_step=0.2, gradient_n=500, search="bisection")
    assert reference_slopes(0.12, 1.7, 0.03) == 6
    assert search_draws(cfg)["total"] == 7500
    cfg = QCRSPlan(epsilon=0.03, left=0.08, right=0.9, epsilon_step=0.4, gradient_n=500, search="bisection")
    assert search_draws(cfg)["total"] == 6500


@pytest.mark.parametrize("left,right,eps", [(0.12, 1.7, 0.03), (0.08, 0.9, 0.03), (0.07, 0.36, 0.001), (0.4, 0.6, 0.01)])
def test_grid_needs_fewer_rounds_and_no_more_draws(left, right, eps):
    grid = QCRSPlan(epsilon=eps, left=left, right=right, gradient_n=500)
    ref = QCRSPlan(epsilon=eps, left=left, right=right, gradient_n=500, search="bisection")
    g, r = search_draws(grid), search_draws(ref)
    assert g["total"] <= r["total"]
    assert g["search_rounds"] < r["search_rounds"]
    rounds, _ = plan_grid(grid)
    # the fewest rounds whose final bracket is at most epsilon wide, as the reference's
    # (closed form, independent of grid_rounds' loop)
    shrink = 2 / (grid.candidates - 1)
    assert rounds == max(1, int(np.ceil(np.log(eps / (right - left)) / np.log(shrink) - 1e-12)))


def test_one_sampler_call_per_round_and_the_planned_draws():
    cfg = QCRSPlan(epsilon=0.03, left=0.12, right=1.7, gradient_n=200)
    q = QCRS(toy(slab), cfg, batch_size=4096)
    idx = np.arange(3)
    q.choose(images([0.5, 0.6, 0.7]), 0.5, method_keys(0, idx, "search"), method_keys(0, idx, "check"))
    d = search_draws(cfg)
    assert q.counter.calls == d["sequential_calls"] == 1 + plan_grid(cfg)[0] + 1
    assert q.counter.draws == d["total"]


@pytest.mark.parametrize("search", ["grid", "bisection"])
def test_finds_the_closed_form_maximiser_on_a_slab(search):
    """Slab classifier: pA(sigma) = Phi((m - a)/sigma) - Phi((-m - a)/sigma); the searched curve is
    sigma * Phi^-1(CP lower bound); its maximiser (computed in closed form) is found within epsilon."""
    eps, n = 0.05, 20000
    cfg = QCRSPlan(epsilon=eps, left=0.02, right=1.0, gradient_n=n, search=search, epsilon_step=2.0)
    n_eval = plan_grid(cfg)[1] if search == "grid" else n
    truth = slab_maximiser(n_eval, cfg.alpha, cfg.left, cfg.right)
    assert 0.1 < truth < 0.2  # an interior maximum
    m = 8
    idx = np.arange(m)
    q = QCRS(toy(slab), cfg, batch_size=1 << 16)
    sigma, info = q.choose(images([0.5] * m), 0.5, method_keys(1, idx, "search"), method_keys(1, idx, "check"))
    err = np.abs(info["search_sigma"] - truth)
    assert err.max() <= eps, (truth, info["search_sigma"])
    # the check keeps sigma* (a far better radius than at sigma0 = 0.5 here)
    np.testing.assert_allclose(sigma, info["search_sigma"])


def test_grid_brackets_shrink_by_two_over_c_minus_one():
    cfg = QCRSPlan(epsilon=0.01, left=0.1, right=1.0, gradient_n=2000, candidates=9)
    q = QCRS(toy(slab), cfg, batch_size=1 << 15)
    _, info = q.choose(images([0.5, 0.55]), 0.3, method_keys(0, np.arange(2), "search"),
                       method_keys(0, np.arange(2), "check"))
    width = cfg.right - cfg.left
    for L, U in info["history"]:
        width *= 2 / (cfg.candidates - 1)
        assert np.all(U - L <= width + 1e-12) and np.all(U >= L)
    assert len(info["history"]) == plan_grid(cfg)[0]


def test_safety_check_keeps_sigma0_when_the_search_is_worse():
    # search interval far above the useful noise: at sigma in [3, 4] the slab abstains, so the
    # check must fall back to sigma0 = 0.15
    cfg = QCRSPlan(epsilon=0.1, left=3.0, right=4.0, gradient_n=500)
    q = QCRS(toy(slab), cfg, batch_size=1 << 14)
    sigma, info = q.choose(images([0.5, 0.5]), 0.15, method_keys(0, np.arange(2), "search"),
                           method_keys(0, np.arange(2), "check"))
    assert np.all(info["search_sigma"] >= 3.0)
    np.testing.assert_allclose(sigma, 0.15)


def test_command_line_options_and_errors():
    method = get_method("qcrs")
    assert method.guarantee == "per-input" and "best_sigma" in method.extra_columns
    chooser = build(method, ["--epsilon", "0.03", "--left", "0.12", "--right", "1.7",
                             "--epsilon_step", "0.2", "--gradient_n", "100"], slab)
    sigma, extras = chooser(images([0.5, 0.6]), np.array([4, 9]), np.array([0.5, 0.5]))
    assert sigma.shape == (2,) and np.all(sigma > 0)
    np.testing.assert_array_equal(extras["best_sigma"], sigma)
    assert chooser.qcrs.cfg.h == pytest.approx(0.15)
    with pytest.raises(RsjaxError, match="--right"):
        build(method, ["--left", "0.5", "--right", "0.4"], slab)
    with pytest.raises(RsjaxError, match="--qcrs-candidates"):
        build(method, ["--qcrs-candidates", "3"], slab)


# --- search budget (--qcrs-budget) ----------------------------------------------------------------
@pytest.mark.parametrize("left,right,eps", [(0.12, 1.7, 0.03), (0.08, 0.9, 0.03), (0.07, 0.36, 0.001)])
@pytest.mark.parametrize("search", ["grid", "bisection"])
def test_reference_budget_is_the_reference_plan(left, right, eps, search):
    ref = QCRSPlan(epsilon=eps, left=left, right=right, gradient_n=500, search=search)
    explicit = QCRSPlan(epsilon=eps, left=left, right=right, gradient_n=500, search=search,
                          budget=reference_budget(ref))
    assert effective_n(explicit) == 500
    a, b = search_draws(ref), search_draws(explicit)
    assert {k: v for k, v in a.items()} == {k: v for k, v in b.items()}
    assert a["total"] <= a["budget"]


@pytest.mark.parametrize("budget", [60, 500, 2999, 3000, 7777])
@pytest.mark.parametrize("search", ["grid", "bisection"])
def test_budget_split_never_exceeds_the_budget(budget, search):
    cfg = QCRSPlan(epsilon=0.03, left=0.08, right=0.9, epsilon_step=0.4, search=search, budget=budget).validate()
    d = search_draws(cfg)
    nB = effective_n(cfg)
    assert d["select"] == nB and d["check"] == 2 * nB
    assert d["total"] <= budget
    # nothing big is left unspent: less than one more draw per evaluation
    per_round = cfg.candidates if search == "grid" else 2
    assert budget - d["total"] < (3 + 2 * reference_slopes(0.08, 0.9, 0.03)) + plan_grid(cfg)[0] * per_round


def test_budget_3pct_of_1e5_finds_the_slab_maximiser_within_draws():
    """--qcrs-budget 3% at N = 100,000: 3,000 draws per image (reference plan at n = 500 on these
    settings: 7,500; grid 2 rounds x 16 candidates x 75 draws). 48 slab points (offsets 0, 0.1,
    0.2 from the centre, 16 noise seeds each), sigma0 = 0.25. Judged against the closed-form
    maximiser of the reference's estimated curve (CP bound at n = 500 draws):

    - per point, |sigma* - maximiser| <= epsilon is NOT reached everywhere: at 75 draws per
      candidate (and at the reference's 187 as well) the curve is flat near its maximum and
      Monte Carlo noise moves the argmax; measured here (seeds 3-5) 58-71% of points within
      epsilon (reference budget 69-79%), median error 0.017-0.026 (<= epsilon), max 0.11-0.16;
    - what matters for the certificate, the radius lost on that curve, is small: mean 2.2-2.6%
      (reference budget 1.6-2.0%).
    The asserts below encode these with some margin, and compare with the reference budget on
    the same points."""
    method = get_method("qcrs")
    eps = 0.03
    chooser = build(method, ["--epsilon", str(eps), "--left", "0.02", "--right", "1.0", "--qcrs-budget", "3%"],
                    slab, batch=1 << 16, n=100_000)
    q = chooser.qcrs
    assert q.cfg.budget == 3000
    rounds, n_c = plan_grid(q.cfg)
    assert (rounds, n_c) == (2, 75)
    offsets = np.repeat([0.0, 0.1, 0.2], 16)
    idx = np.arange(offsets.size)
    keys = method_keys(3, idx, "search"), method_keys(3, idx, "check")
    _, info = q.choose(images(0.5 + offsets), 0.25, *keys)
    # draws actually used, counted at the sampler: <= the budget, one call per round
    assert q.counter.draws <= 3000 and q.counter.draws == search_draws(q.cfg)["total"] == 3000
    assert q.counter.calls == 1 + rounds + 1

    truth = np.array([slab_maximiser(500, q.cfg.alpha, 0.02, 1.0, a) for a in offsets])

    def quality(found):
        err = np.abs(found - truth)
        curve = lambda s: cp_radius_curve(slab_pA(s, offsets), s, 500, q.cfg.alpha)  # noqa: E731
        return err, np.mean(1 - curve(found) / curve(truth))

    err, loss = quality(info["search_sigma"])
    assert np.median(err) <= eps, np.sort(err)
    assert np.mean(err <= eps) >= 0.5
    assert err.max() <= 0.2
    assert loss <= 0.04, loss

    ref = QCRS(toy(slab), QCRSPlan(epsilon=eps, left=0.02, right=1.0), batch_size=1 << 16)
    _, ref_info = ref.choose(images(0.5 + offsets), 0.25, *keys)
    assert ref.counter.draws == 7484
    _, ref_loss = quality(ref_info["search_sigma"])
    assert loss - ref_loss <= 0.015, (loss, ref_loss)


def test_budget_parsing_and_errors():
    assert parse_budget("reference") is None and parse_budget(None) is None
    assert parse_budget("3000") == 3000 and parse_budget("3%", 100_000) == 3000
    assert parse_budget("2.5%", 1000) == 25
    for bad, msg in [("abc", "--qcrs-budget must be"), ("0", "--qcrs-budget must be"), ("-5", "--qcrs-budget must be"),
                     ("2.5", "--qcrs-budget must be"), ("150%", "percentage"), ("x%", "--qcrs-budget must be")]:
        with pytest.raises(RsjaxError, match=msg):
            parse_budget(bad, 1000)
    with pytest.raises(RsjaxError, match="needs --N"):
        parse_budget("3%")
    method = get_method("qcrs")
    # 3% of N = 1000 is 30 draws: fewer than 3 + 2 x 16 candidates
    with pytest.raises(RsjaxError, match="too small") as e:
        build(method, ["--epsilon", "0.03", "--left", "0.08", "--right", "0.9", "--qcrs-budget", "3%"], slab, n=1000)
    with pytest.raises(RsjaxError, match="needs --N"):
        build(method, ["--qcrs-budget", "3%"], slab)  # a percentage needs the certificate's N
    assert "\n" not in str(e.value)


def test_bisection_follows_the_reference_on_zero_slopes():
    """A classifier whose estimated radius is 0 at every sigma (p_A = 1/2 exactly: the image sits
    on the half-space boundary), so every slope is zero. The reference's direction rule
    (ntuaislab/QCRS code/core_qcrs.py, binary_search_bisection) then goes down first and reverses
    at every later step, recording each move: on [0.12, 1.7] with epsilon 0.03 it ends at 0.6508
    (the rule that recorded only non-zero slopes ended at 0.8977)."""
    cfg = QCRSPlan(epsilon=0.03, left=0.12, right=1.7, epsilon_step=0.2, gradient_n=200, search="bisection",
                   check=False)
    q = QCRS(toy(halfspace), cfg, batch_size=4096)
    idx = np.arange(3)
    sigma, info = q.choose(images([BOUNDARY] * 3), 0.25, method_keys(0, idx, "search"), method_keys(0, idx, "check"))
    # the reference's loop, by hand: down, then up/down alternately
    L, U = 0.12, 1.7
    U = (L + U) / 2
    up = True
    while U - L > 0.03:
        mid = (L + U) / 2
        L, U = (mid, U) if up else (L, mid)
        up = not up
    assert round((L + U) / 2, 4) == 0.6508
    np.testing.assert_allclose(sigma, (L + U) / 2)
    assert len(info["history"]) == reference_slopes(0.12, 1.7, 0.03)


def test_safety_check_rules():
    """``rsjax`` (default): a side whose own argmax is not c_A has radius 0, so the check never
    moves to a sigma certified for another class; ``reference`` (the reference's fast_certify):
    each side's radius for its own argmax, so it does. Here c_A = 1 while the half-space predicts
    class 0 at both sigmas."""
    x = images([V0, V0])
    keys = method_keys(0, np.arange(2), "check")
    cA = np.array([1, 1])
    sigma0, sigma_star = np.array([0.1, 0.1]), np.array([0.2, 0.2])
    ours = QCRS(toy(halfspace), QCRSPlan(gradient_n=400), batch_size=4096)
    kept, rad = ours.safety_check(x, sigma0, sigma_star, keys, cA)
    np.testing.assert_array_equal(kept, sigma0)
    assert np.all(rad == 0)
    ref = QCRS(toy(halfspace), QCRSPlan(gradient_n=400, check_rule="reference"), batch_size=4096)
    kept, rad = ref.safety_check(x, sigma0, sigma_star, keys, cA)
    np.testing.assert_array_equal(kept, sigma_star)
    assert np.all(rad[:, 1] > rad[:, 0]) and np.all(rad > 0)
    with pytest.raises(RsjaxError, match="--qcrs-check-rule"):
        QCRSConfig(qcrs_check_rule="other")  # a config made in Python is validated too


def test_pabar_comes_from_the_chooser_after_certify():
    method = get_method("qcrs")
    chooser = build(method, ["--epsilon", "0.3", "--left", "0.12", "--right", "1.0", "--gradient_n", "50"], slab)
    sigma, extras = chooser(images([0.5]), np.array([0]), np.array([0.5]))
    done = chooser.finish(extras, predict=np.array([0]), radius=np.array([0.3]), pA_lower=np.array([0.77]))
    assert set(done) == set(method.extra_columns) and done["pABar"][0] == 0.77
