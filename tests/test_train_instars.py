"""Insta-RS Train (derived from the abstract): the two stages and the known equilibrium of the
per-example sigma rule."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, stats

from rsjax.errors import RsjaxError
from rsjax.training import instars_train as it
from rsjax.training.objectives import get_objective
from rsjax.training.step import step_fn
from tests.test_train_ds import frozen_toy

BOUNDARY = 1.0  # half-space on one pixel: class 0 iff v < BOUNDARY


def halfspace(params, batch_stats, x):
    v = x[:, 0, 0, 0]
    z = 20.0 * (BOUNDARY - v) + 0.0 * params["w"]
    return jnp.stack([z, -z], -1), batch_stats


def p_half(n, up):
    """The per-copy accuracy p at which P(Binomial(n, p) >= ceil(up n)) = 1/2 (the rule's equilibrium)."""
    m = int(np.ceil(up * n - 1e-9))
    return optimize.brentq(lambda p: stats.binom.sf(m - 1, n, p) - 0.5, 1e-6, 1 - 1e-6)


def run(cfg, distances, epochs, sigma0=0.25, labels=None):
    """Steps of the instars objective on the half-space, the network frozen; the table per epoch."""
    objective = get_objective("instars")
    state, batch, tx = frozen_toy(BOUNDARY - np.asarray(distances), sigma0, labels=labels)
    fns = {}
    out = []
    for epoch in range(epochs):
        phase = objective.phase(cfg, epoch)
        if phase not in fns:
            fns[phase] = jax.jit(functools.partial(step_fn, objective, cfg, tx, halfspace, seed=0, sigma=sigma0,
                                                   num_classes=2, phase=phase))
        state, _ = fns[phase](state=state, batch=batch, epoch=epoch)
        out.append(np.asarray(state.example_state["sigma"]))
    return np.array(out)


def test_known_equilibrium_of_the_vote_rule():
    """For a half-space at distance d the per-copy accuracy is Phi(d / sigma), so the multiplicative rule
    settles at sigma = d / Phi^-1(p_half); the median of the last epochs is within one factor of it."""
    cfg = it.InstaRSTrainConfig(instars_stage1_epochs=2, instars_n=16, instars_up=0.75, instars_factor=1.05,
                                instars_sigma_min=0.02, instars_sigma_max=3.0)
    d = np.linspace(0.1, 0.6, 6)
    reps = 16  # independent copies of each distance (own noise streams)
    tables = run(cfg, np.repeat(d, reps), 200)
    np.testing.assert_array_equal(tables[:2], 0.25)  # stage 1: the global sigma
    assert np.abs(tables[2] - 0.25).max() > 0  # stage 2 adapts
    truth = d / stats.norm.ppf(p_half(16, 0.75))
    med = np.median(tables[-100:].reshape(100, len(d), reps).transpose(1, 0, 2).reshape(len(d), -1), axis=1)
    assert (np.abs(np.log(med / truth)) < np.log(1.05)).all(), (med, truth)
    # negative control: the truth of another rule constant (up = 0.9) is far from this table
    other = d / stats.norm.ppf(p_half(16, 0.9))
    assert (np.abs(np.log(med / other)) > np.log(1.05) * 3).all()


def test_misclassified_examples_shrink_to_the_lower_bound():
    cfg = it.InstaRSTrainConfig(instars_stage1_epochs=0, instars_n=8, instars_sigma_min=0.05)
    tables = run(cfg, np.array([0.3, 0.3]), 30, labels=[0, 1])  # example 1 has the wrong label
    assert tables[-1, 1] == np.float32(0.05)
    assert tables[-1, 0] > 0.2


def test_every_and_soft_statistic_and_macer_base():
    cfg = it.InstaRSTrainConfig(instars_stage1_epochs=1, instars_every=2, instars_statistic="soft")
    tables = run(cfg, np.array([0.2, 0.5]), 5)
    # adaptation on epochs 1 and 3 only (every 2nd epoch of stage 2)
    np.testing.assert_array_equal(tables[1], tables[2])
    assert (tables[1] != tables[0]).all() and (tables[3] != tables[2]).all()
    macer = run(dataclasses.replace(cfg, instars_base="macer", instars_gauss_num=4), np.array([0.2, 0.5]), 3)
    np.testing.assert_array_equal(macer, tables[:3])  # the rule does not depend on the base loss


@pytest.mark.parametrize("kwargs", [dict(instars_n=0), dict(instars_up=1.5), dict(instars_down=0.9),
                                    dict(instars_factor=1.0), dict(instars_every=0),
                                    dict(instars_sigma_min=1.0, instars_sigma_max=0.5)])
def test_bad_settings_are_one_clear_error(kwargs):
    with pytest.raises(RsjaxError, match="--instars-"):
        it.InstaRSTrainConfig(**kwargs)
