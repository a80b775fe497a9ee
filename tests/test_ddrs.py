"""DDRS: the jitted gradient ascent on the radius surrogate (spec 4.1) and the memory-based
certification (spec 4.3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from rsjax.errors import RsjaxError
from rsjax.methods import get_method
from rsjax.methods._common import method_keys
from rsjax.methods.ddrs import Ascent, DDRSConfig, make_optimizer, surrogate_radius
from rsjax.methods.memory import Memory
from tests._helpers_methods import META, build, images, method_config


def soft_classifier(x):
    """Three classes with smooth logits in the first pixel (gradients flow through sigma*eps)."""
    v = x[:, 0, 0, 0]
    return jnp.stack([4.0 * (0.6 - v), 4.0 * (v - 0.4), 0.5 * jnp.sin(6 * v)], axis=-1)


def confident(x):
    v = x[:, 0, 0, 0]
    return jnp.stack([1e3 + 0 * v, 0 * v, 0 * v], axis=-1)


def test_jax_grad_matches_finite_differences_of_the_surrogate():
    x = jnp.asarray(images([0.45, 0.55, 0.7]))
    keys = method_keys(0, np.arange(3), "optimize")
    opt = make_optimizer(soft_classifier, Ascent(n=4, clamp=(0.001, 0.999)))
    eps = opt.noise(keys, jnp.uint32(0), x.shape[1:])
    sigma = jnp.asarray([0.3, 0.4, 0.5])
    R = jax.jit(lambda s: surrogate_radius(soft_classifier, x, s, eps, (0.001, 0.999)))
    g = jax.jit(jax.grad(lambda s: R(s).sum()))(sigma)
    h = 1e-2
    for i in range(3):
        e = jnp.zeros(3).at[i].set(h)
        fd = (R(sigma + e)[i] - R(sigma - e)[i]) / (2 * h)
        assert float(g[i]) == pytest.approx(float(fd), rel=2e-2, abs=1e-3)
        assert abs(float(g[i])) > 1e-3  # a non-trivial gradient


def test_saturated_surrogate_has_the_closed_form_path():
    """psi = (1, 0, 0) is clipped to (0.98, 0.02): dR/dsigma = Phi^-1(0.98), so after K steps
    sigma_K = sigma_0 + K * lr * Phi^-1(0.98) exactly."""
    cfg = Ascent(lr=1e-3, steps=50)
    opt = make_optimizer(confident, cfg)
    s = opt(images([0.2, 0.9]), jnp.asarray([0.25, 0.5]), method_keys(0, np.arange(2), "optimize"))
    expect = np.array([0.25, 0.5]) + 50 * 1e-3 * stats.norm.ppf(0.98)
    np.testing.assert_allclose(np.asarray(s), expect, rtol=1e-5)


def test_jitted_loop_equals_a_python_loop_and_is_batch_invariant():
    cfg = Ascent(lr=5e-2, steps=7, n=3)
    opt = make_optimizer(soft_classifier, cfg)
    x = jnp.asarray(images([0.42, 0.5, 0.63]))
    idx = np.array([3, 8, 11])
    keys = method_keys(5, idx, "optimize")
    got = np.asarray(opt(x, jnp.full(3, 0.3), keys))
    sigma = jnp.full(3, 0.3)
    grad = jax.jit(jax.grad(lambda s, eps: surrogate_radius(soft_classifier, x, s, eps, cfg.clamp).sum()))
    noise = jax.jit(opt.noise, static_argnums=2)
    for k in range(cfg.steps):
        sigma = sigma + cfg.lr * grad(sigma, noise(keys, jnp.uint32(k), x.shape[1:]))
    np.testing.assert_allclose(got, np.asarray(sigma), rtol=1e-5)
    assert not np.allclose(got, 0.3)
    alone = np.asarray(opt(x[1:2], jnp.full(1, 0.3), keys[1:2]))
    np.testing.assert_allclose(alone, got[1:2], rtol=1e-5)


def test_cli_defaults_start_at_the_training_sigma():
    method = get_method("ddrs")
    assert method.guarantee == "per-input"
    chooser = build(method, [], confident, {**META, "sigma": 0.12})
    sigma, extras = chooser(images([0.3, 0.6]), np.array([0, 1]), np.array([0.5, 0.5]))
    np.testing.assert_allclose(extras["sigma0"], 0.12)  # meta sigma wins over SIGMA
    np.testing.assert_allclose(sigma, 0.12 + 100 * 1e-4 * stats.norm.ppf(0.98), rtol=1e-5)
    chooser = build(method, ["--ddrs-steps", "0"], confident)
    sigma, extras = chooser(images([0.3]), np.array([0]), np.array([0.5]))
    np.testing.assert_allclose(sigma, 0.5)  # no training sigma: SIGMA
    with pytest.raises(RsjaxError, match="--ddrs-clamp"):
        method_config(method, ["--ddrs-clamp", "0.9,0.1"])
    with pytest.raises(RsjaxError, match="--ddrs-lr"):
        DDRSConfig(ddrs_lr=-1.0)  # a config made in Python is validated too
    assert method.memory(method_config(method), "/tmp/x") is None


# --- memory (spec 4.3) --------------------------------------------------------------------------
def pts(*coords):
    """Points of a 2-pixel image at the given (a, b) coordinates: x of shape (M, 1, 2, 1)."""
    return np.asarray(coords, np.float32).reshape(-1, 1, 2, 1)


def brute_force(xs, cs, rs):
    """The algorithm of spec 4.3 in plain numpy (float64), one point at a time."""
    mx, mc, mr, out = [], [], [], []
    for x, c, r in zip(xs.reshape(len(xs), -1).astype(np.float64), cs, rs):
        conf = [(np.linalg.norm(x - y) - ry, cy) for y, cy, ry in zip(mx, mc, mr)
                if cy != c and np.linalg.norm(x - y) < r + ry]
        if conf:
            rp, cj = min(conf, key=lambda t: t[0])
            c, r = (cj, -rp) if rp < 0 else (c, rp)
        out.append((c, r))
        if c != -1:
            mx.append(x), mc.append(c), mr.append(r)
    return np.array([o[0] for o in out]), np.array([o[1] for o in out])


def test_memory_shrinks_relabels_and_keeps():
    m = Memory()
    c, r = m.update(pts((0, 0)), [0], [1.0])
    assert (c[0], r[0]) == (0, 1.0)
    c, r = m.update(pts((1.5, 0), (0.4, 0), (0, 0.5), (9, 9), (0, -0.3)), [1, 1, 0, 2, -1], [1.0, 2.0, 0.3, 1.0, 0.0])
    np.testing.assert_array_equal(c, [1, 0, 0, 2, 0])
    # shrink to 1.5 - 1; inside the ball -> class 0 with 1 - 0.4; same class: kept; far: kept;
    # abstain inside the first ball: adopts class 0 with radius 1 - 0.3
    np.testing.assert_allclose(r, [0.5, 0.6, 0.3, 1.0, 0.7], rtol=1e-6)
    assert m.changed == 3 and len(m) == 6  # the adopted abstention is stored too


def test_memory_matches_a_brute_force_reference_and_grows():
    rng = np.random.default_rng(0)
    n = 150  # more than the initial capacity 64
    xs = rng.uniform(0, 3, size=(n, 1, 2, 1)).astype(np.float32)
    cs = rng.integers(-1, 3, size=n)
    rs = np.where(cs >= 0, rng.uniform(0, 0.6, size=n), 0.0)
    m = Memory()
    got_c, got_r = [], []
    for s in range(0, n, 37):  # uneven batches
        c, r = m.update(xs[s:s + 37], cs[s:s + 37], rs[s:s + 37])
        got_c.append(c), got_r.append(r)
    ref_c, ref_r = brute_force(xs, cs, rs)
    np.testing.assert_array_equal(np.concatenate(got_c), ref_c)
    np.testing.assert_allclose(np.concatenate(got_r), ref_r, rtol=1e-5, atol=1e-6)
    assert m.changed == int(((ref_c != cs) | (np.abs(ref_r - rs) > 1e-6)).sum()) > 0


def test_memory_resumes_from_its_file(tmp_path):
    rng = np.random.default_rng(1)
    xs = rng.uniform(0, 2, size=(40, 1, 2, 1)).astype(np.float32)
    cs = rng.integers(0, 3, size=40)
    rs = rng.uniform(0, 0.7, size=40)
    idx = np.arange(40) * 20
    whole = Memory()
    ref = whole.update(xs, cs, rs, idx=idx)
    out = tmp_path / "cert.tsv"
    first = Memory.for_output(out)
    a = first.update(xs[:25], cs[:25], rs[:25], idx=idx[:25])
    first.save()
    assert (tmp_path / "cert.tsv.memory.npz").exists()
    # an output without rows (or --overwrite) starts a fresh memory; one with rows resumes it
    out.write_text("# seed=0\nidx\tlabel\tpredict\tradius\tcorrect\ttime\n")
    assert len(Memory.for_output(out)) == 0
    out.write_text("# seed=0\nidx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t0.1\n")
    assert len(Memory.for_output(out, fresh=True)) == 0
    resumed = Memory.for_output(out)
    assert len(resumed) == len(first) and resumed.changed == first.changed
    # a resumed run re-feeding an image already in memory gets the stored answer back
    again = resumed.update(xs[20:40], cs[20:40], rs[20:40], idx=idx[20:40])
    np.testing.assert_array_equal(np.concatenate([a[0], again[0][5:]]), ref[0])
    np.testing.assert_allclose(np.concatenate([a[1], again[1][5:]]), ref[1], rtol=1e-6)
    assert resumed.changed == whole.changed and len(resumed) == len(whole)


def test_memory_flag_gives_the_memory_guarantee(tmp_path):
    method = get_method("ddrs")
    mem = method.memory(method_config(method, ["--ddrs-memory"]), tmp_path / "o.tsv")
    assert isinstance(mem, Memory)
