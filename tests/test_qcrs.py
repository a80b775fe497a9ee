"""QCRS: the vectorised quasiconcave search against a closed-form radius curve and the
reference's bisection (spec section 5)."""

import numpy as np
import pytest

from rsjax.errors import RsjaxError
from rsjax.methods import get_method
from rsjax.methods._common import method_keys
from rsjax.methods.qcrs import QCRS, QCRSConfig, plan_grid, reference_slopes, search_draws
from tests._helpers_methods import META, images, parse_method_args, slab, slab_maximiser


def test_reference_accounting_matches_the_spec_table():
    # spec 5.2: CIFAR sigma=0.5 README settings -> 5 loop iterations (6 slopes), 7,500 extra draws
    cfg = QCRSConfig(epsilon=0.03, left=0.12, right=1.7, epsilon_step=0.2, gradient_n=500, search="bisection")
    assert reference_slopes(0.12, 1.7, 0.03) == 6
    assert search_draws(cfg)["total"] == 7500
    cfg = QCRSConfig(epsilon=0.03, left=0.08, right=0.9, epsilon_step=0.4, gradient_n=500, search="bisection")
    assert search_draws(cfg)["total"] == 6500


@pytest.mark.parametrize("left,right,eps", [(0.12, 1.7, 0.03), (0.08, 0.9, 0.03), (0.07, 0.36, 0.001), (0.4, 0.6, 0.01)])
def test_grid_needs_fewer_rounds_and_no_more_draws(left, right, eps):
    grid = QCRSConfig(epsilon=eps, left=left, right=right, gradient_n=500)
    ref = QCRSConfig(epsilon=eps, left=left, right=right, gradient_n=500, search="bisection")
    g, r = search_draws(grid), search_draws(ref)
    assert g["total"] <= r["total"]
    assert g["search_rounds"] < r["search_rounds"]
    rounds, _ = plan_grid(grid)
    # the final bracket is at most epsilon wide, as the reference's
    assert (right - left) * (2 / (grid.candidates - 1)) ** rounds <= eps


def test_one_sampler_call_per_round_and_the_planned_draws():
    cfg = QCRSConfig(epsilon=0.03, left=0.12, right=1.7, gradient_n=200)
    q = QCRS(slab, 2, cfg, batch_size=4096)
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
    cfg = QCRSConfig(epsilon=eps, left=0.02, right=1.0, gradient_n=n, search=search, epsilon_step=2.0)
    n_eval = plan_grid(cfg)[1] if search == "grid" else n
    truth = slab_maximiser(n_eval, cfg.alpha, cfg.left, cfg.right)
    assert 0.1 < truth < 0.2  # an interior maximum
    m = 8
    idx = np.arange(m)
    q = QCRS(slab, 2, cfg, batch_size=1 << 16)
    sigma, info = q.choose(images([0.5] * m), 0.5, method_keys(1, idx, "search"), method_keys(1, idx, "check"))
    err = np.abs(info["search_sigma"] - truth)
    assert err.max() <= eps, (truth, info["search_sigma"])
    # the check keeps sigma* (a far better radius than at sigma0 = 0.5 here)
    np.testing.assert_allclose(sigma, info["search_sigma"])


def test_grid_brackets_shrink_by_two_over_c_minus_one():
    cfg = QCRSConfig(epsilon=0.01, left=0.1, right=1.0, gradient_n=2000, candidates=9)
    q = QCRS(slab, 2, cfg, batch_size=1 << 15)
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
    cfg = QCRSConfig(epsilon=0.1, left=3.0, right=4.0, gradient_n=500)
    q = QCRS(slab, 2, cfg, batch_size=1 << 14)
    sigma, info = q.choose(images([0.5, 0.5]), 0.15, method_keys(0, np.arange(2), "search"),
                           method_keys(0, np.arange(2), "check"))
    assert np.all(info["search_sigma"] >= 3.0)
    np.testing.assert_allclose(sigma, 0.15)


def test_command_line_options_and_errors():
    method = get_method("qcrs")
    assert method.guarantee == "per-input" and "best_sigma" in method.extra_columns
    args = parse_method_args(method, ["--epsilon", "0.03", "--left", "0.12", "--right", "1.7",
                                      "--epsilon_step", "0.2", "--gradient_n", "100"])
    chooser = method.build(args, slab, META)
    sigma, extras = chooser(images([0.5, 0.6]), np.array([4, 9]), np.array([0.5, 0.5]))
    assert sigma.shape == (2,) and np.all(sigma > 0)
    np.testing.assert_array_equal(extras["best_sigma"], sigma)
    assert chooser.qcrs.cfg.h == pytest.approx(0.15)
    with pytest.raises(RsjaxError, match="--right"):
        method.build(parse_method_args(method, ["--left", "0.5", "--right", "0.4"]), slab, META)
    with pytest.raises(RsjaxError, match="--qcrs-candidates"):
        method.build(parse_method_args(method, ["--qcrs-candidates", "3"]), slab, META)
