"""Insta-RS: the multi-start search of spec section 6 (rules documented in rsjax.methods.instars)."""

import numpy as np
import pytest

from rsjax.errors import RsjaxError
from rsjax.methods import get_method
from rsjax.methods._common import method_keys
from rsjax.methods.instars import InstaRS, InstaRSConfig, InstaRSSearch, draws_per_image, start_set
from tests._helpers_methods import META, cp_radius_curve, images, build, method_config, slab, slab_pA, toy


def test_start_set_rules():
    cfg = InstaRSSearch(exponents=(-2, -1, 0, 1, 2), train_sigmas=(0.12, 0.25, 3.0))
    # sigma0 * 2^k in [sigma0/4, 4 sigma0] plus the training sigmas inside, sorted, no duplicates
    assert start_set(0.25, cfg) == [0.0625, 0.12, 0.125, 0.25, 0.5, 1.0]
    cfg = InstaRSSearch(exponents=(-1, 0, 1), sigma_min=0.2, sigma_max=0.6)
    assert start_set(0.25, cfg) == [0.25, 0.5]
    with pytest.raises(RsjaxError, match="no Insta-RS start"):
        start_set(0.25, InstaRSSearch(exponents=(3,), sigma_max=1.0))


def test_all_starts_in_one_sampler_call_per_step():
    cfg = InstaRSSearch(n=64, n0=32, steps=3, train_sigmas=(0.12,))
    ins = InstaRS(toy(slab), cfg, batch_size=1 << 14)
    sigma, info = ins.choose(images([0.5, 0.6, 0.8]), 0.25, method_keys(0, np.arange(3), "search"))
    assert info["starts"].shape == (3, 4)  # 0.125, 0.12, 0.25, 0.5
    assert ins.counter.calls == 2 + cfg.steps
    assert ins.counter.draws == draws_per_image(4, cfg)
    lo, hi = cfg.bounds(0.25)
    assert np.all((sigma >= lo) & (sigma <= hi))


def test_reaches_the_closed_form_optimum_on_a_slab():
    """From starts sigma0 * {1/2, 1, 2} = 0.2, 0.4, 0.8, the search must reach the maximiser of
    the CP radius curve (about 0.145 at n = 4000) and a radius within 5% of its maximum."""
    cfg = InstaRSSearch(n=4000, steps=6, eta=0.25, sigma_min=0.02, sigma_max=2.0)
    grid = np.linspace(0.02, 2.0, 20001)
    curve = cp_radius_curve(slab_pA(grid), grid, cfg.n, cfg.alpha)
    best_sigma, best_r = grid[np.argmax(curve)], curve.max()
    m = 6
    ins = InstaRS(toy(slab), cfg, batch_size=1 << 16)
    sigma, info = ins.choose(images([0.5] * m), 0.4, method_keys(2, np.arange(m), "search"))
    r = cp_radius_curve(slab_pA(sigma), sigma, cfg.n, cfg.alpha)
    assert np.all(r >= 0.95 * best_r), (sigma, best_sigma)
    assert np.all(np.abs(sigma - best_sigma) < 0.05)
    # the winning start is one of the starts
    assert set(np.round(info["sigma_start"], 6)) <= {0.2, 0.4, 0.8}


def test_command_line_and_training_sigma_start():
    method = get_method("instars")
    assert method.guarantee == "per-input"
    chooser = build(method, ["--instars-n", "64", "--instars-steps", "1"], slab, {**META, "sigma": 0.3})
    assert chooser.insta.cfg.train_sigmas == (0.3,)
    sigma, extras = chooser(images([0.5, 0.7]), np.array([1, 2]), np.array([0.25, 0.25]))
    assert sigma.shape == (2,) and set(extras) == set(method.extra_columns)
    with pytest.raises(RsjaxError, match="--instars-eta"):
        method_config(method, ["--instars-eta", "1.5"])
    with pytest.raises(RsjaxError, match="--instars-exponents"):
        method_config(method, ["--instars-exponents", "a,b"])
