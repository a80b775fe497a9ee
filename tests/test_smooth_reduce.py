"""Smooth-Reduce: the maps against PyTorch and the reference's unfold, the operator norms against a
dense SVD, batch-size invariance, bad input, and known-truth statistics with a negative control.

Known truth. With K = 2 and the per-patch linear classifier f(q) = (0, w.q + b) the smoothed
classifier is linear in the image and its robust radius is known in closed form:

- shared noise, mean of logits: vote 1 iff a.(z + sigma eps) + b > 0 with a = mean_k A_k^T w, so
  g(x) = [a.Ux + b > 0] and the true image radius is |a.Ux + b| / ||U^T a||;
- independent noise, P = 2 patches, any of mean/max/min of the softmax: since
  s(l1) + s(l2) > 1 <=> l1 + l2 > 0 for the logistic s, vote 1 iff
  w.(q1 + sigma eps1) + w.(q2 + sigma eps2) + 2b > 0, so g(x) = [w.(A1 + A2)Ux + 2b > 0] and the
  true radius is |w.(A1 + A2)Ux + 2b| / ||U^T (A1 + A2)^T w||.

The sound radius may exceed the truth only when the Clopper-Pearson bound fails (rate <= alpha);
the raw radius sigma Phi^-1(pA_lower) exceeds it far more often, because the resize (nearest,
x2) and the patch stacking stretch distances.
"""

import argparse
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats

from rsjax.certifiers import patches as geo
from rsjax.certifiers.smooth_reduce import (CERTIFIER, SmoothReduceConfig, SmoothReduceRunner, build, draw_votes,
                                            geometry, smooth_reduce_certify)
from rsjax.config import add_arguments, from_args, to_dict
from rsjax.errors import RsjaxError


def linear2(w, b):
    """Per-patch logits (0, w.q + b) for patches q (B, p, p, C)."""
    w = jnp.asarray(w, jnp.float32)

    def f(q):
        l1 = jnp.einsum("bijc,ijc->b", q, w) + b
        return jnp.stack([jnp.zeros_like(l1), l1], axis=-1)

    return f


# ------------------------------------------------------------------ maps against PyTorch / the reference

@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("sizes", [((32, 32), (36, 36)), ((36, 36), (32, 32)), ((5, 7), (9, 3)), ((4, 4), (8, 8))])
def test_resize_matches_torch_interpolate(mode, sizes):
    (h, w), out = sizes
    x = np.random.default_rng(0).uniform(size=(2, h, w, 3)).astype(np.float32)
    rh, rw = geo.resize_matrices((h, w), out, mode)
    ours = np.asarray(geo.resize(jnp.asarray(x), rh, rw))
    kw = dict(align_corners=False, antialias=True) if mode == "bilinear" else {}
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=out, mode=mode, **kw)
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=2e-6)


@pytest.mark.parametrize("stride,num", [(1, 25), (1, 7), (2, 100)])
def test_grid_patches_in_reference_order(stride, num):
    """PatchModel.get_patches: unfold rows, unfold columns, flatten, first P."""
    x = np.random.default_rng(1).uniform(size=(1, 9, 9, 2)).astype(np.float32)
    p = 5
    cfg = SmoothReduceConfig(resize=None, patch_size=p, patch_stride=stride, num_patches=num)
    g = geometry(cfg, x.shape[1:])
    from rsjax.certifiers.smooth_reduce import _extract

    ours = np.asarray(_extract(jnp.asarray(x[0]), g.corners, p))  # (P, p, p, C)
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    ref = t.unfold(2, p, stride).unfold(3, p, stride)
    _, c, px, py, _, _ = ref.shape
    ref = ref.reshape(1, c, px * py, p, p)[:, :, :num].permute(0, 2, 1, 3, 4)[0]
    assert ours.shape[0] == min(num, px * py) == g.num_patches
    np.testing.assert_array_equal(ours, ref.permute(0, 2, 3, 1).numpy())


def test_votes_match_the_reference_reductions():
    """PatchSmooth._sample_noise (softmax, then max/mean over patches, argmax) and PatchModel.forward
    (raw outputs reduced) on the same logits."""
    logits = np.random.default_rng(2).normal(size=(6, 5, 4)).astype(np.float32) * 3  # (draws, P, K)
    t = torch.from_numpy(logits)
    aggs = ("mean", "max", "min")
    ind, _ = draw_votes(jnp.asarray(logits), "independent", aggs)
    sh, _ = draw_votes(jnp.asarray(logits), "shared", aggs)
    sm = torch.softmax(t, dim=-1)
    ref_ind = {"mean": sm.mean(1), "max": sm.max(1)[0], "min": sm.min(1)[0]}
    ref_sh = {"mean": t.mean(1), "max": t.max(1)[0], "min": t.min(1)[0]}
    for i, a in enumerate(aggs):
        np.testing.assert_array_equal(np.asarray(ind[i]), ref_ind[a].argmax(1).numpy())
        np.testing.assert_array_equal(np.asarray(sh[i]), ref_sh[a].argmax(1).numpy())


# ------------------------------------------------------------------ operator norms

def dense_maps(geom, corners):
    """Explicit matrices U (H W, h w) and A U (P p p, h w) on one channel, column by column."""
    h, w = geom.in_shape[:2]
    u = np.kron(geom.rh, geom.rw)
    rows = []
    for r, s in corners:
        idx = (np.arange(r, r + geom.patch)[:, None] * geom.size[1] + np.arange(s, s + geom.patch)[None]).ravel()
        rows.append(u[idx])
    return u, np.concatenate(rows)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("kw", [dict(num_patches=25), dict(num_patches=7), dict(num_patches=6, random_patches=True),
                                dict(num_patches=4, patch_stride=3)])
def test_norms_equal_dense_svd(mode, kw):
    cfg = SmoothReduceConfig(resize=11, patch_size=7, resize_mode=mode, **kw)
    geom = geometry(cfg, (8, 8, 3))
    f = linear2(np.zeros((7, 7, 3)), 0.0)
    runner = SmoothReduceRunner(cfg, f, 2, (8, 8, 3), key=3)
    corners = runner.corners(np.array([0, 1]))[0]
    u, au = dense_maps(geom, corners)
    cover = geo.coverage(corners, 11, 11, 7)
    covered = np.flatnonzero(cover.ravel() > 0)
    n_ind, cmax = runner.norms(corners[None])
    n_sh, _ = SmoothReduceRunner(dataclasses.replace(cfg, noise="shared"), f, 2, (8, 8, 3),
                                 key=3).norms(corners[None])
    exact_ind, exact_sh = np.linalg.norm(au, 2), np.linalg.norm(u[covered], 2)
    assert exact_ind <= n_ind[0] <= exact_ind * (1 + 1e-8)
    assert exact_sh <= n_sh[0] <= exact_sh * (1 + 1e-8)
    assert cmax[0] == cover.max()
    # never above the spec's bound sqrt(c_max) ||U|| (and ||U|| for shared noise)
    assert n_ind[0] <= np.sqrt(cmax[0]) * np.linalg.norm(u, 2) * (1 + 1e-8)
    assert n_sh[0] <= np.linalg.norm(u, 2) * (1 + 1e-8)


def test_large_image_fallback_is_an_upper_bound(monkeypatch):
    rh, rw = geo.resize_matrices((8, 8), (11, 11), "bilinear")
    c = geo.coverage(np.array([[0, 0], [1, 3], [4, 2]]), 11, 11, 7)
    exact = geo.weighted_norm(rh, rw, c)
    monkeypatch.setattr(geo, "DENSE_PIXELS", 0)
    assert geo.weighted_norm(rh, rw, c) >= exact


# ------------------------------------------------------------------ invariances and bookkeeping

@pytest.mark.parametrize("noise,random_patches", [("independent", False), ("shared", True)])
def test_results_do_not_depend_on_batch_size_or_companions(noise, random_patches):
    rng = np.random.default_rng(4)
    f = linear2(rng.normal(size=(6, 6, 1)), 0.1)
    x = rng.uniform(size=(5, 4, 4, 1)).astype(np.float32)
    cfg = SmoothReduceConfig(resize=8, patch_size=6, num_patches=5, noise=noise, random_patches=random_patches,
                             resize_mode="nearest")
    kw = dict(n0=13, n=57, alpha=0.01)
    big, small = (SmoothReduceRunner(cfg, f, 2, (4, 4, 1), key=11, batch_size=bs) for bs in (1000, 7))
    idx = np.arange(10, 15)
    base = big.certify(x, idx, 0.5, **kw)
    several = small.certify(x, idx, 0.5, **kw)  # one draw per step
    alone = small.certify(x[3:4], idx[3:4], 0.5, **kw)  # same layout as `several`: no new compilation
    for k in base:
        np.testing.assert_array_equal(base[k], several[k])
        np.testing.assert_array_equal(base[k][3:4], alone[k])
    assert np.any(base["predict"] >= 0)
    other = big.certify(x, idx + 5, 0.5, **kw)  # other dataset indices: other noise
    assert not np.array_equal(base["pA_lower"], other["pA_lower"])


def test_aggregates_share_draws_and_progress_counts_draws():
    rng = np.random.default_rng(5)
    f = linear2(rng.normal(size=(6, 6, 1)), 0.0)
    x = rng.uniform(size=(3, 4, 4, 1)).astype(np.float32)
    cfg = SmoothReduceConfig(resize=8, patch_size=6, num_patches=9, resize_mode="nearest", aggregate="max")
    meta = {"num_classes": 2, "input_shape": [4, 4, 1]}
    done = []
    both = build(cfg, (f, meta), seed=2, batch_size=40).certify_aggregates(
        x, np.arange(3), 0.3, n0=10, n=90, alpha=0.01, aggregates=("mean", "max"), progress=done.append)
    assert sum(done) == 3 * (10 + 90) and len(done) > 2
    one = build(cfg, (f, meta), seed=2, batch_size=1000).certify(x, np.arange(3), 0.3, n0=10, n=90, alpha=0.01)
    assert set(one) >= {"predict", "radius", "pA_lower", "nonfinite", *CERTIFIER["columns"]}
    for k in one:
        np.testing.assert_array_equal(one[k], both["max"][k])
        assert len(one[k]) == 3


def test_nonfinite_draws_give_no_vote():
    """A classifier that returns NaN on patches whose first pixel is above a threshold."""
    def f(q):
        v = q[:, 0, 0, 0]
        return jnp.stack([jnp.where(v > 0.5, jnp.nan, 1.0), jnp.zeros_like(v)], axis=-1)

    x = np.full((2, 4, 4, 1), 0.5, np.float32)
    x[1] = 5.0  # every draw non-finite
    cfg = SmoothReduceConfig(resize=None, patch_size=4, num_patches=1, noise="shared")
    r = smooth_reduce_certify(f, x, sigma=0.1, n0=20, n=200, alpha=0.01, key=0, batch_size=64, config=cfg)
    # image 0: about half the draws are NaN, the rest vote 0 -> pA_lower < 1/2 -> abstain
    assert 80 < r["nonfinite"][0] < 140 and r["predict"][0] == -1
    assert r["nonfinite"][1] == 220 and r["predict"][1] == -1 and r["pA_lower"][1] == 0.0


def test_random_corners_per_image_and_range():
    cfg = SmoothReduceConfig(resize=10, patch_size=7, num_patches=50, random_patches=True)
    f = linear2(np.zeros((7, 7, 3)), 0.0)
    r = SmoothReduceRunner(cfg, f, 2, (8, 8, 3), key=1)
    c = r.corners(np.array([0, 1, 0]))
    assert c.shape == (3, 50, 2) and c.min() == 0 and c.max() == 10 - 7 - 1  # reference: randint(0, H - p)
    np.testing.assert_array_equal(c[0], c[2])
    assert not np.array_equal(c[0], c[1])
    assert not np.array_equal(c[0], SmoothReduceRunner(cfg, f, 2, (8, 8, 3), key=2).corners(np.array([0]))[0])


def test_config_flags_and_settings():
    p = argparse.ArgumentParser()
    add_arguments(p, SmoothReduceConfig)
    ns = p.parse_args("--resize 40 --patch-size 32 --patch-stride 2 --num-patches 9 --aggregate max "
                      "--noise shared --random-patches --resize-mode nearest".split())
    cfg = from_args(SmoothReduceConfig, ns)
    assert cfg == SmoothReduceConfig(40, 32, 2, 9, "max", "shared", True, "nearest")
    assert to_dict(cfg)["aggregate"] == "max"
    with pytest.raises(SystemExit):
        p.parse_args(["--aggregate", "median"])
    assert CERTIFIER["name"] == "smooth-reduce" and CERTIFIER["config"] is SmoothReduceConfig


@pytest.mark.parametrize("kw,words", [
    (dict(resize=36, patch_size=40), "larger than the resized image"),
    (dict(num_patches=0), "--num-patches"),
    (dict(patch_stride=0), "--patch-stride"),
    (dict(resize=20, patch_size=32), "larger than the resized image"),
    (dict(aggregate="median"), "--aggregate"),
    (dict(noise="correlated"), "--noise"),
    (dict(resize=0), "--resize"),
])
def test_bad_config_is_one_line(kw, words):
    with pytest.raises(RsjaxError) as e:
        SmoothReduceConfig(**kw)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_patch_larger_than_unresized_input():
    cfg = SmoothReduceConfig(resize=None, patch_size=32)
    with pytest.raises(RsjaxError, match="larger than the input image"):
        build(cfg, (linear2(np.zeros((32, 32, 1)), 0.0), {"num_classes": 2, "input_shape": [28, 28, 1]}),
              seed=0, batch_size=10)


# ------------------------------------------------------------------ known truth

def check_known_truth(cfg, w, b, lin, x, *, sigma, alpha, n0, n, aggregates):
    """{aggregate: (sound failures, raw failures, certified rows)}: a failure is a non-abstaining row
    whose class is not g(x) or whose radius exceeds the true one; lin = (vector v, offset) with
    g(x) = [v.x + offset > 0] and true radius |v.x + offset| / ||v|| (v acting on the flat image)."""
    m = len(x)
    runner = build(cfg, (linear2(w, b), {"num_classes": 2, "input_shape": x.shape[1:]}), seed=5, batch_size=512)
    res = runner.certify_aggregates(x, np.arange(m), sigma, n0=n0, n=n, alpha=alpha, aggregates=aggregates)
    v, off = lin
    margin = x.reshape(m, -1).astype(np.float64) @ v + off
    truth_class, truth_radius = (margin > 0).astype(int), np.abs(margin) / np.linalg.norm(v)
    out = {}
    for a, r in res.items():
        cert = r["predict"] != -1
        bad = lambda rad: int(np.sum(cert & ((r["predict"] != truth_class) | (rad > truth_radius))))
        out[a] = (bad(r["radius"]), bad(r["radius_raw"]), int(cert.sum()))
    return out


def margins_images(m, shape, rng):
    """Images around the boundary: constant images at levels 0.5 +- t plus a little texture."""
    t = rng.uniform(-0.45, 0.45, size=m)
    return (0.5 + t[:, None, None, None] + 0.02 * rng.normal(size=(m, *shape))).astype(np.float32)


def test_known_truth_shared_mean():
    rng = np.random.default_rng(6)
    cfg = SmoothReduceConfig(resize=8, patch_size=6, patch_stride=2, num_patches=4, noise="shared",
                             resize_mode="nearest")
    geom = geometry(cfg, (4, 4, 1))
    w = np.ones((6, 6, 1))
    u, _ = dense_maps(geom, geom.corners)
    a = geo.coverage(geom.corners, 8, 8, 6).ravel() / geom.num_patches  # mean_k A_k^T w
    b = -float(a @ u @ np.full(16, 0.5))  # boundary at the constant image 1/2
    x = margins_images(400, (4, 4, 1), rng)
    alpha = 0.05
    m = len(x)
    (sound, raw, cert), = check_known_truth(cfg, w, b, (u.T @ a, b), x, sigma=0.5, alpha=alpha, n0=32, n=256,
                                            aggregates=("mean",)).values()
    assert cert > 0.8 * m
    assert sound <= stats.binom.ppf(0.9999, m, alpha)
    # negative control: ||U|| = 2 here, the raw radius is about twice the true one (rows whose
    # pA_lower saturates at alpha^(1/n) can stay below the truth)
    assert raw > 0.5 * cert


def test_known_truth_independent_two_patches():
    rng = np.random.default_rng(7)
    cfg = SmoothReduceConfig(resize=8, patch_size=7, patch_stride=1, num_patches=2, noise="independent",
                             resize_mode="nearest")
    geom = geometry(cfg, (4, 4, 1))
    u, au = dense_maps(geom, geom.corners)
    # w: the direction the stacked map stretches most among those shared by both patches, so the
    # raw radius overshoots the truth by about s_max((A1 + A2) U) / sqrt(2)
    k = au.shape[0] // 2
    s = au[:k] + au[k:]  # (A1 + A2) U
    w = np.linalg.svd(s)[0][:, 0].reshape(7, 7, 1)
    w *= np.sign(w.sum())
    v = s.T @ w.ravel()
    b = -float(v @ np.full(16, 0.5)) / 2
    x = margins_images(400, (4, 4, 1), rng)
    alpha = 0.05
    m = len(x)
    res = check_known_truth(cfg, w, b, (v, 2 * b), x, sigma=0.5, alpha=alpha, n0=32, n=256,
                            aggregates=("mean", "max", "min"))
    for sound, raw, cert in res.values():
        assert cert > 0.8 * m
        assert sound <= stats.binom.ppf(0.9999, m, alpha)
        assert raw > 0.5 * cert


FOUR_DEVICES = """
import jax, numpy as np
from tests.test_smooth_reduce import linear2
from rsjax.certifiers.smooth_reduce import SmoothReduceConfig, SmoothReduceRunner

assert len(jax.local_devices()) == 4
rng = np.random.default_rng(4)
f = linear2(rng.normal(size=(6, 6, 1)), 0.1)
x = rng.uniform(size=(3, 4, 4, 1)).astype(np.float32)
for noise in ("independent", "shared"):
    cfg = SmoothReduceConfig(resize=8, patch_size=6, num_patches=5, noise=noise, resize_mode="nearest")
    four = SmoothReduceRunner(cfg, f, 2, (4, 4, 1), key=11, batch_size=30)
    one = SmoothReduceRunner(cfg, f, 2, (4, 4, 1), key=11, batch_size=30, devices=jax.local_devices()[:1])
    assert four.mesh.devices.size == 4 and one.mesh.devices.size == 1
    a = four.certify(x, np.arange(3), 0.5, n0=13, n=77, alpha=0.01)
    b = one.certify(x, np.arange(3), 0.5, n0=13, n=77, alpha=0.01)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
print("OK")
"""


def test_four_devices_give_the_counts_of_one():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    r = subprocess.run([sys.executable, "-c", FOUR_DEVICES], capture_output=True, text=True, env=env, cwd=root,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr[-3000:]
