"""DS-Gaussian and DS-MACER (DDRS section 4.2): parity with the reference's PyTorch code, the
settings the reference lacks, and known truth for the per-example sigma ascent."""

import contextlib
import sys
import dataclasses
import functools

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from converters.pytorch import torch_to_flax
from converters.torch_reference import LeNet as TorchLeNet
from rsjax.errors import RsjaxError
from rsjax.methods.ddrs import surrogate_radius
from rsjax.models import build_model
from rsjax.training import ds
from rsjax.training.objectives import get_objective
from rsjax.training.step import TrainState, make_optimizer, metric_names, step_fn, train_apply, zero_sums

# ----------------------------------------------------------------------------------------------
# The reference's code, copied from MotasemAlfarra/Data_Dependent_Randomized_Smoothing @ 3a06e82,
# CIFAR10/train_macer.py (get_sigma, macer_loss, compute_loss and the body of train()'s loop).
# Edits: device is the CPU (macer_loss's default was 'cuda'), the loop body is a function of one
# batch, and the "10" of reshape(batch_size, gaussian_num, 10) is CIFAR's (and MNIST's) class count.
device = torch.device("cpu")


def compute_loss(outputs_softmax, targets):
    outputs_logsoftmax = torch.log(outputs_softmax + 1e-10)  # avoid nan
    loss = nn.NLLLoss()
    classification_loss = loss(outputs_logsoftmax, targets)
    return classification_loss


def get_sigma(model, batch, lr_sig, sig_0, iters, device='cuda:0', ret_radius = False, gaussian_num=1):
    sig = torch.autograd.Variable(sig_0, requires_grad=True).view(batch.shape[0], 1, 1, 1)
    m = torch.distributions.normal.Normal(torch.zeros(batch.shape[0]).to(device), torch.ones(batch.shape[0]).to(device))
    # model.eval()
    batch_size = batch.shape[0]
    for param in model.parameters():
        param.requires_grad_(False)

    new_shape = [batch_size * gaussian_num]
    new_shape.extend(batch[0].shape)
    new_batch = batch.repeat((1,gaussian_num, 1, 1)).view(new_shape)

    for _ in range(iters):
        sigma_repeated = sig.repeat((1, gaussian_num, 1, 1)).view(-1,1,1,1)
        eps = torch.randn_like(new_batch)*sigma_repeated
        out = model(new_batch + eps).reshape(batch_size, gaussian_num, 10).mean(1)

        vals, ind = torch.topk(out, 2)
        vals.transpose_(0, 1)
        gap = m.icdf(vals[0].clamp_(0.02, 0.98)) - m.icdf(vals[1].clamp_(0.02, 0.98))
        radius = sig.reshape(-1)/2 * gap  # The radius formula
        grad = torch.autograd.grad(radius.sum(), sig)
        sig.data += lr_sig*grad[0]  # Gradient Ascent step

    for param in model.parameters():
        param.requires_grad_(True)
    # model.train()
    eps = torch.randn_like(batch)*sig
    if ret_radius:
        return sig.reshape(-1), batch + eps, radius
    return sig.reshape(-1), batch + eps


def macer_loss(probs, labels, sigma, gamma = 0.1, device = 'cpu'):
    vals, ind = torch.topk(probs, 2)
    correct_ind = ind[:, 0] == labels
    m = torch.distributions.normal.Normal(torch.zeros(sum(correct_ind).item()).to(device),
                                          torch.ones(sum(correct_ind).item()).to(device))
    gap = m.icdf(vals[correct_ind, 0].clamp_(0.02, 0.98)) - m.icdf(vals[correct_ind, 1].clamp_(0.02, 0.98))
    radius = sigma[correct_ind].reshape(-1)/2 * gap.to(device)
    return torch.relu(gamma - radius).mean()


def reference_train_batch(model, optimizer, batch, targets, idx, sigma_0, lr_sigma, iters_sig, gaussian_num=1,
                          lamda=0.0, gamma=0.0, gaussian_num_ds=1):
    optimizer.zero_grad()

    batch_size = len(idx)
    batch = batch.to(device)
    targets = targets.to(device)

    # model.eval()
    sigma, _ = get_sigma(model, batch, lr_sigma, sigma_0[idx], iters_sig, device, gaussian_num=gaussian_num_ds)
    # model.train()
    sigma_0[idx] = sigma  # updating sigma

    #repeating the input for computing the macer loss
    new_shape = [batch_size * gaussian_num]
    new_shape.extend(batch[0].shape)
    batch = batch.repeat((1,gaussian_num, 1, 1)).view(new_shape)
    #repeating sigmas to do the monte carlo
    sigma_repeated = sigma.repeat((1, gaussian_num, 1, 1)).view(-1,1,1,1)
    noise = torch.randn_like(batch)*sigma_repeated

    batch_corrupted = batch + noise

    outputs_softmax = model(batch_corrupted).reshape(batch_size, gaussian_num, 10).mean(1)#10 here is for CIFAR10

    total_loss = compute_loss(outputs_softmax, targets)
    total_loss += lamda*macer_loss(outputs_softmax, targets, sigma, gamma)

    # update parameters
    total_loss.backward()
    optimizer.step()
    return total_loss.item(), sigma_0
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def scripted_randn_like(draws):
    """``torch.randn_like`` returns the given tensors in order (the JAX draws), checking shapes."""
    queue = list(draws)
    real = torch.randn_like

    def fake(t, *a, **k):
        want = queue.pop(0)
        assert tuple(want.shape) == tuple(t.shape), (want.shape, t.shape)
        return want.clone()

    torch.randn_like = fake
    try:
        yield queue
    finally:
        torch.randn_like = real
    assert not queue, f"{len(queue)} scripted draws unused"


def nchw(eps):
    """JAX draws (B, n, H, W, C) -> PyTorch rows (B * n, C, H, W), an example's copies adjacent."""
    e = np.asarray(eps)
    return torch.from_numpy(np.array(e.transpose(0, 1, 4, 2, 3).reshape((-1,) + e.shape[4:] + e.shape[2:4])))


@functools.lru_cache(maxsize=None)
def lenet_pair():
    """A PyTorch LeNet (seeded init) wrapped with the softmax the DDRS models end in, and the same
    weights as Flax variables."""
    torch.manual_seed(0)
    net = TorchLeNet(10)
    variables = torch_to_flax(net.state_dict(), "lenet", 10)
    return net, jax.tree_util.tree_map(jnp.asarray, variables)


def batch_of(b=6, seed=1):
    """b images in [0, 1] and labels: half the argmax of the network (correct examples), half not."""
    rng = np.random.default_rng(seed)
    x = (rng.uniform(0, 1, (b, 28, 28, 1)) * np.linspace(0.2, 1.0, b)[:, None, None, None]).astype(np.float32)
    net, _ = lenet_pair()
    with torch.no_grad():
        pred = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).argmax(1).numpy()
    y = np.where(np.arange(b) % 2 == 0, pred, (pred + 1 + np.arange(b) % 3) % 10).astype(np.int32)
    return x, y


def torch_model():
    net, _ = lenet_pair()
    fresh = TorchLeNet(10)
    fresh.load_state_dict(net.state_dict())
    return nn.Sequential(fresh, nn.Softmax(dim=1)).train()


APPLY = functools.partial(train_apply, build_model("lenet", 10), 0.0, 1.0)


def keys_for(idx, epoch=0, seed=0):
    from rsjax.training.objectives import example_keys

    return example_keys(seed, jnp.asarray(idx), epoch)


@pytest.mark.parametrize("lr,steps,n", [(1e-4, 10, 4), (0.05, 3, 2)])
def test_sigma_update_matches_the_reference(lr, steps, n):
    x, y = batch_of()
    _, variables = lenet_pair()
    idx = np.array([3, 9, 0, 14, 7, 5])
    sigma0 = np.linspace(0.1, 0.6, 6).astype(np.float32)
    keys = keys_for(idx)
    got, _ = jax.jit(functools.partial(ds.ascend_sigma, APPLY, steps=steps, lr=lr, n=n, clamp=(0.02, 0.98)))(
        variables["params"], {}, jnp.asarray(x), jnp.asarray(sigma0), keys)
    draws = [nchw(ds.ascent_noise(keys, k, n, x.shape[1:])) for k in range(steps)]
    with scripted_randn_like(draws + [torch.zeros(6, 1, 28, 28)]):
        ref, _ = get_sigma(torch_model(), torch.from_numpy(x.transpose(0, 3, 1, 2)), lr, torch.from_numpy(sigma0.copy()),
                           steps, device, gaussian_num=n)
    ref = ref.detach().numpy()
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-6, rtol=0)
    moved = np.abs(ref - sigma0)
    assert moved.min() > 5e-6  # every sigma moved
    assert (np.abs(np.asarray(got) - ref) <= 0.05 * moved).all()  # and rsjax's moved the same way


class TinyBN(flax.linen.Module):
    """conv 3x3 (4 channels) -> BatchNorm -> relu -> spatial mean -> dense 10: the batch statistics
    couple the examples' radii, as in the CIFAR ResNets."""

    @flax.linen.compact
    def __call__(self, x, train: bool = False):
        x = flax.linen.Conv(4, (3, 3), padding="VALID", name="conv")(x)
        x = flax.linen.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(x)
        return flax.linen.Dense(10, name="fc")(flax.linen.relu(x).mean(axis=(1, 2)))


def tiny_bn_pair():
    """TinyBN in PyTorch (seeded init, softmax appended, train mode) and its Flax variables."""
    torch.manual_seed(0)
    conv, bn, fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 10)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    net = nn.Sequential(conv, bn, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc, nn.Softmax(dim=1)).train()
    t = lambda a: jnp.asarray(a.detach().numpy())  # noqa: E731
    variables = {"params": {"conv": {"kernel": t(conv.weight).transpose(2, 3, 1, 0), "bias": t(conv.bias)},
                            "bn": {"scale": t(bn.weight), "bias": t(bn.bias)},
                            "fc": {"kernel": t(fc.weight).T, "bias": t(fc.bias)}},
                 "batch_stats": {"bn": {"mean": jnp.zeros(4), "var": jnp.ones(4)}}}
    return net, variables


def test_sigma_update_with_batchnorm_matches_the_reference():
    """BatchNorm in train mode couples the radii through the batch statistics: the ascent must use
    the gradient of sum_i R_i (the reference's), not the per-example forward-mode slopes, which
    are only equal without coupling (negative control)."""
    x, _ = batch_of()
    net, variables = tiny_bn_pair()
    apply = functools.partial(train_apply, TinyBN(), 0.0, 1.0)
    idx, steps, n, lr = np.array([3, 9, 0, 14, 7, 5]), 3, 2, 0.05
    sigma0 = np.linspace(0.1, 0.6, 6).astype(np.float32)
    keys = keys_for(idx)
    got, _ = jax.jit(functools.partial(ds.ascend_sigma, apply, steps=steps, lr=lr, n=n, clamp=(0.02, 0.98)))(
        variables["params"], variables["batch_stats"], jnp.asarray(x), jnp.asarray(sigma0), keys)
    draws = [nchw(ds.ascent_noise(keys, k, n, x.shape[1:])) for k in range(steps)]
    with scripted_randn_like(draws + [torch.zeros(6, 1, 28, 28)]):
        ref, _ = get_sigma(net, torch.from_numpy(x.transpose(0, 3, 1, 2)), lr, torch.from_numpy(sigma0.copy()),
                           steps, device, gaussian_num=n)
    ref = ref.detach().numpy()
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-6, rtol=0)
    assert np.abs(ref - sigma0).min() > 1e-4  # every sigma moved

    eps = ds.ascent_noise(keys, 0, n, x.shape[1:])
    radii = lambda s: (surrogate_radius(lambda z: apply(variables["params"], variables["batch_stats"], z)[0],  # noqa: E731
                                        jnp.asarray(x), s, eps, (0.02, 0.98)), 0.0)
    column, _ = ds.radius_slopes(radii, jnp.asarray(sigma0), coupled=True)
    row, _ = ds.radius_slopes(radii, jnp.asarray(sigma0), coupled=False)
    assert np.abs(np.asarray(column - row)).max() > 1e-3 * np.abs(np.asarray(column)).max()


def test_forward_mode_slopes_equal_the_gradient_of_the_sum_without_batchnorm():
    """No coupling (LeNet): dR_i/dsigma_j = 0 for i != j, so the jvp along 1 is grad of sum_i R_i."""
    x, _ = batch_of()
    _, variables = lenet_pair()
    keys = keys_for(np.arange(6))
    eps = ds.ascent_noise(keys, 0, 3, x.shape[1:])
    radii = lambda s: (surrogate_radius(lambda z: APPLY(variables["params"], {}, z)[0], jnp.asarray(x), s, eps,  # noqa: E731
                                        (0.02, 0.98)), 0.0)
    sigma = jnp.linspace(0.1, 0.6, 6)
    column, _ = ds.radius_slopes(radii, sigma, coupled=True)
    row, _ = ds.radius_slopes(radii, sigma, coupled=False)
    assert np.abs(np.asarray(column)).min() > 1e-3
    np.testing.assert_allclose(np.asarray(row), np.asarray(column), rtol=1e-5, atol=1e-6)


def ds_state(objective, cfg, variables, table, tx, x_shape):
    params = variables["params"]
    names = metric_names(objective, cfg, APPLY, num_classes=10, x_shape=x_shape, example_state={"sigma": table},
                         params=params, batch_stats={})
    return TrainState(params=params, batch_stats={}, opt_state=tx.init(params), example_state={"sigma": table},
                      sums=zero_sums(names), step=jnp.int32(0))


def run_step(name, cfg, x, y, idx, rows, table, *, lr=0.05, wd=5e-4, epoch=0, seed=0):
    objective = get_objective(name)
    _, variables = lenet_pair()
    tx = make_optimizer(lr=lr, schedule="constant", gamma=0.1, epochs=1, steps_per_epoch=1, momentum=0.9,
                        weight_decay=wd)
    state = ds_state(objective, cfg, variables, jnp.asarray(table), tx, x.shape)
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y), "idx": jnp.asarray(idx, jnp.int32),
             "row": jnp.asarray(rows, jnp.int32)}
    fn = jax.jit(functools.partial(step_fn, objective, cfg, tx, APPLY, seed=seed, sigma=0.25, num_classes=10,
                                   phase=objective.phase(cfg, epoch)))
    return fn(state=state, batch=batch, epoch=epoch)


@pytest.mark.parametrize("layout,spread", [("reference", True), ("example", False)])
def test_ds_macer_step_matches_the_reference(layout, spread):
    """One DS-MACER step (sigma ascent, NLL + lambda * hinge over the correct examples, SGD with
    momentum and weight decay) against the reference's loop body on the same weights, batch and noise:
    with distinct sigmas in the reference's copy layout; with equal sigmas (where the layouts agree,
    ascent off) in the per-example one."""
    x, y = batch_of()
    idx = np.array([3, 9, 0, 14, 7, 5])
    table = np.full(16, 0.12, np.float32)
    table[idx] = np.linspace(0.1, 0.5, 6) if spread else 0.3
    steps = 3 if spread else 0
    cfg = ds.DSConfig(ds_lr=0.05, ds_steps=steps, ds_n=2, ds_gauss_num=4, ds_copy_sigma=layout)
    new, sums = run_step("ddrs-macer", cfg, x, y, idx, idx, table)

    keys = keys_for(idx)
    draws = [nchw(ds.ascent_noise(keys, k, 2, x.shape[1:])) for k in range(steps)]
    from rsjax.training.objectives import per_example_normal

    train_eps = nchw(per_example_normal(keys, (4,) + x.shape[1:]))
    model = torch_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sigma_t = torch.from_numpy(table.copy())
    with scripted_randn_like(draws + [torch.zeros(6, 1, 28, 28), train_eps]):
        ref_loss, sigma_t = reference_train_batch(model, opt, torch.from_numpy(x.transpose(0, 3, 1, 2)),
                                                  torch.from_numpy(y.astype(np.int64)), torch.from_numpy(idx),
                                                  sigma_t, 0.05, steps, gaussian_num=4, lamda=12.0, gamma=8.0,
                                                  gaussian_num_ds=2)
    np.testing.assert_allclose(np.asarray(new.example_state["sigma"]), sigma_t.detach().numpy(), atol=1e-6, rtol=0)
    # the loss is ~98 (lambda 12 x hinge ~8): float32 spacing there is 7.6e-6, so allow 2 ulp besides 1e-5
    assert float(sums["loss"]) / 6 == pytest.approx(ref_loss, abs=1e-5, rel=2e-7)
    ref_vars = torch_to_flax({k[2:]: v for k, v in model.state_dict().items()}, "lenet", 10)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(new.params),
                            jax.tree_util.tree_leaves(ref_vars["params"])):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6, err_msg=str(path))
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
        jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(lenet_pair()[1]["params"])))
    assert moved > 1e-3  # the step changed the weights
    assert 0 < float(sums["correct"]) < 6  # both branches of the hinge's mask were exercised


def test_no_correct_example_gives_a_finite_loss_where_the_reference_gives_nan():
    x, y = batch_of()
    _, variables = lenet_pair()
    net, _ = lenet_pair()
    with torch.no_grad():
        pred = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).argmax(1).numpy()
    y = ((pred + 1) % 10).astype(np.int32)  # every example wrong
    probs = torch.softmax(net(torch.from_numpy(x.transpose(0, 3, 1, 2))), 1)
    assert np.isnan(macer_loss(probs, torch.from_numpy(y.astype(np.int64)), torch.full((6,), 0.25), 8.0).item())
    idx = np.arange(6)
    cfg = ds.DSConfig(ds_steps=1, ds_n=1, ds_gauss_num=1)
    new, sums = run_step("ddrs-macer", cfg, x, y, idx, idx, np.full(6, 0.25, np.float32))
    assert np.isfinite(float(sums["loss"])) and float(sums["robustness_loss"]) == 0.0
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(new.params))


def test_ds_gaussian_without_ascent_is_gaussian_training():
    """--ds-steps 0: DS-Gaussian is Gaussian augmentation at the table's sigma (same draws)."""
    x, y = batch_of()
    idx = np.array([3, 9, 0, 14, 7, 5])
    cfg = ds.DSConfig(ds_steps=0)
    new, sums = run_step("ddrs-gaussian", cfg, x, y, idx, idx, np.full(16, 0.25, np.float32))
    g, gsums = run_step("gaussian", get_objective("gaussian").config(), x, y, idx, idx, np.zeros(16, np.float32))
    assert float(sums["loss"]) == pytest.approx(float(gsums["loss"]), rel=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(g.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(new.example_state["sigma"]), 0.25)


@pytest.mark.parametrize("kwargs", [dict(ds_sigma0=0.0), dict(ds_lr=-1.0), dict(ds_steps=-1), dict(ds_n=0), dict(ds_clamp_lo=0.99),
                                    dict(ds_sigma_min=0.5, ds_sigma_max=0.4), dict(ds_gamma=0.0)])
def test_bad_settings_are_one_clear_error(kwargs):
    with pytest.raises(RsjaxError, match="--ds-"):
        ds.DSConfig(**kwargs)


def test_reference_defaults_per_objective():
    g, m = ds.resolved(ds.DSConfig(), "ddrs-gaussian"), ds.resolved(ds.DSConfig(), "ddrs-macer")
    assert (g.ds_steps, g.ds_n, g.ds_gauss_num) == (1, 1, 1)  # ImageNet/train_rs.py
    assert (m.ds_steps, m.ds_n, m.ds_gauss_num, m.ds_lbd, m.ds_gamma) == (10, 64, 64, 12.0, 8.0)  # train_macer.py
    assert ds.resolved(ds.DSConfig(ds_steps=3), "ddrs-macer").ds_steps == 3
    init = get_objective("ddrs-macer").init_example_state
    np.testing.assert_array_equal(init(ds.DSConfig(), 5, 0.25)["sigma"], np.full(5, 0.25, np.float32))
    np.testing.assert_array_equal(init(ds.DSConfig(ds_sigma0=0.12), 5, 0.25)["sigma"], np.full(5, 0.12, np.float32))


# ---------------------------------------------------------------------------------------- known truth
# A two-class "probit slab" on one pixel v: softmax output p0(v) = Phi(kap (h - u)) + Phi(kap (h + u)) - 1,
# u = v - c. Under v + sigma z, E[p0] = Phi((h - a)/s) + Phi((h + a)/s) - 1 with s = sqrt(kap^-2 + sigma^2)
# (Gaussian-probit identity), a = the example's offset from the centre. So the surrogate's expectation
# R_i(sigma) = sigma Phi^-1(clip E[p0]) is closed form, with a unique maximiser sigma*_i in the region where
# class 0 wins; the examples' offsets a_i give distinct sigma*_i.
KAP, HALF, CENTRE = 10.0, 0.4, 0.5


def probit_slab(params, batch_stats, x):
    from jax.scipy.stats import norm

    u = x[:, 0, 0, 0] - CENTRE
    p = jnp.clip(norm.cdf(KAP * (HALF - u)) + norm.cdf(KAP * (HALF + u)) - 1, 1e-7, 1 - 1e-7)
    return jnp.stack([jnp.log(p), jnp.log1p(-p)], -1) + 0.0 * params["w"], batch_stats


def slab_maximisers(a, lo=0.02, hi=0.98):
    from scipy import stats

    grid = np.linspace(0.01, 1.0, 99001)
    s = np.sqrt(KAP ** -2 + grid ** 2)
    out = []
    for ai in a:
        p = stats.norm.cdf((HALF - ai) / s) + stats.norm.cdf((HALF + ai) / s) - 1
        r = np.where(p > 0.5, grid * stats.norm.ppf(np.clip(p, lo, hi)), -1.0)
        out.append(grid[np.argmax(r)])
    return np.array(out)


def frozen_toy(pixels, table, labels=None, idx=None):
    """(state, batch, tx) for a one-pixel toy network with one dummy weight, lr 0 (the network frozen)."""
    import optax

    x = jnp.asarray(np.asarray(pixels).reshape(-1, 1, 1, 1), jnp.float32)
    m = x.shape[0]
    tx = optax.sgd(0.0)
    params = {"w": jnp.zeros(())}
    state = TrainState(params=params, batch_stats={}, opt_state=tx.init(params),
                       example_state={"sigma": jnp.broadcast_to(jnp.asarray(table, jnp.float32), (m,))},
                       sums=zero_sums(["loss", "sigma", "correct", "examples"]), step=jnp.int32(0))
    y = jnp.zeros(m, jnp.int32) if labels is None else jnp.asarray(labels, jnp.int32)
    batch = {"x": x, "y": y, "idx": jnp.asarray(np.arange(m) if idx is None else idx, jnp.int32),
             "row": jnp.arange(m, dtype=jnp.int32)}
    return state, batch, tx


def run_slab(offsets, idx_seen, sigma0, steps=40):
    """DS-Gaussian steps on the slab with the network frozen (lr 0): 40 epochs x 25 ascent steps."""
    objective = get_objective("ddrs-gaussian")
    cfg = ds.DSConfig(ds_lr=3e-3, ds_steps=25, ds_n=64)
    state, batch, tx = frozen_toy(CENTRE + np.asarray(offsets), sigma0, idx=idx_seen)
    fn = jax.jit(functools.partial(step_fn, objective, cfg, tx, probit_slab, seed=0, sigma=sigma0, num_classes=2,
                                   phase=1))
    for epoch in range(steps):
        state, _ = fn(state=state, batch=batch, epoch=epoch)
    return np.asarray(state.example_state["sigma"])


def test_known_truth_the_table_moves_to_each_examples_radius_maximiser():
    a = np.linspace(0.0, 0.3, 12)
    star = slab_maximisers(a)
    assert star.max() - star.min() > 0.05  # distinct targets
    for sigma0 in (0.12, 0.3):  # from below and from above
        got = run_slab(a, np.arange(12), sigma0)
        err = np.abs(got - star)
        assert err.max() < 0.25 * np.abs(sigma0 - star).min(), (got, star)
        assert err.mean() < 0.006
        # negative control: the same table against another example's target is far off
        assert np.abs(got - star[::-1]).mean() > 4 * err.mean()


def test_known_truth_negative_control_a_misindexed_table_fails_the_check():
    """Writing each example's ascent into another example's row (the images permuted against the
    rows) leaves the table far from the per-row truth: the check above can fail."""
    a = np.linspace(0.0, 0.3, 12)
    star = slab_maximisers(a)
    got = run_slab(a[::-1], np.arange(12), 0.12)  # row r holds the example with offset a[11 - r]
    assert np.abs(got - star).mean() > 0.02


def slab_step(cfg, table, epoch, offsets=(0.0, 0.1, 0.2, 0.3)):
    """One DS-Gaussian step on the slab (network frozen); returns the new table."""
    objective = get_objective("ddrs-gaussian")
    state, batch, tx = frozen_toy(CENTRE + np.asarray(offsets), table)
    new, _ = step_fn(objective, cfg, tx, probit_slab, seed=0, sigma=0.25, num_classes=2,
                     phase=objective.phase(cfg, epoch), state=state, batch=batch, epoch=epoch)
    return np.asarray(new.example_state["sigma"])


def test_start_epoch_bounds_and_the_floor():
    table = np.full(4, 0.12, np.float32)
    cfg = ds.DSConfig(ds_start_epoch=2, ds_lr=0.01, ds_steps=3, ds_n=8)
    np.testing.assert_array_equal(slab_step(cfg, table, epoch=1), table)  # before --ds-start-epoch
    free = slab_step(cfg, table, epoch=2)
    assert np.abs(free - 0.12).min() > 1e-4 and free.mean() > 0.125  # below the maximisers: up on average
    boxed = slab_step(dataclasses.replace(cfg, ds_sigma_max=0.125), table, epoch=2)
    assert boxed.max() == np.float32(0.125) and (boxed <= np.float32(0.125)).all()
    # above the maximiser the gradient is negative: one long step overshoots below 0
    above, big = np.full(2, 0.35, np.float32), dataclasses.replace(cfg, ds_lr=1.0, ds_steps=1, ds_n=64)
    down = slab_step(dataclasses.replace(big, ds_sigma_min=0.05), above, epoch=2, offsets=(0.0, 0.05))
    np.testing.assert_array_equal(down, np.float32(0.05))
    floor = slab_step(big, above, epoch=2, offsets=(0.0, 0.05))  # no bound: still never <= 0
    np.testing.assert_array_equal(floor, np.float32(ds.SIGMA_FLOOR))


# ---------------------------------------------------------------------------------- runs of rsjax train
DS_RUN = ["--method", "ddrs-macer", "--ds-steps", "2", "--ds-n", "2", "--ds-gauss-num", "2", "--ds-lr", "0.05",
          "--sigma", "0.25"]


def test_resume_after_sigkill_restores_the_sigma_table_bit_for_bit(tmp_path):
    """A DS-MACER run killed with SIGKILL after a mid-epoch checkpoint and rerun ends with the same
    parameters and the same sigma table, bit for bit, as an uninterrupted run."""
    import signal
    import subprocess
    import time

    from tests._helpers_train import kill_mid_epoch, rsjax_cmd, subprocess_env, write_mnist

    data = tmp_path / "mnist"
    write_mnist(data, n=48, seed=0, prefix="train")
    env = subprocess_env()

    def cmd(out):
        return rsjax_cmd("train", "mnist", "lenet", out, "--data-dir", data, "--epochs", "2", "--batch", "8",
                         "--lr", "0.05", "--checkpoint-every-steps", "2", "--test-split", "train", "--quiet", *DS_RUN)

    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(cmd(full), env=env, check=True, capture_output=True)
    # mid-epoch in the second epoch (6 steps per epoch)
    killed_at = kill_mid_epoch(cmd(killed), killed, env, lambda s: s % 6 != 0 and s > 6)
    assert killed_at is not None and killed_at < 12, "the run ended before it could be killed mid-epoch"
    resumed = subprocess.run(cmd(killed), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    a, b = np.load(full / "sigma_train.npy"), np.load(killed / "sigma_train.npy")
    np.testing.assert_array_equal(a, b)
    assert a.shape == (48,) and np.abs(a - 0.25).max() > 1e-3  # the table really moved
    from rsjax.classifier import load_classifier

    va = load_classifier(full / "model", fold_bn=False, pack_narrow=False)[0].variables
    vb = load_classifier(killed / "model", fold_bn=False, pack_narrow=False)[0].variables
    for x, y in zip(jax.tree_util.tree_leaves(va), jax.tree_util.tree_leaves(vb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    rows = [__import__("json").loads(ln) for ln in (full / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["sigma_mean"] == pytest.approx(float(a.mean()), rel=1e-6)
    assert (full / "sigma_train_hist" / "epoch_0002.png").stat().st_size > 1000


DEVICES_SCRIPT = r"""
import sys, numpy as np, jax
from rsjax.training.trainer import TrainConfig, train
from rsjax.training.objectives import get_objective
from rsjax.training import ds
d, out = sys.argv[1], sys.argv[2]
assert jax.local_device_count() == 4
cfg = TrainConfig(method="ddrs-macer", epochs=1, batch=8, lr=0.002, test_split="none", subset="0:40")
ocfg = ds.DSConfig(ds_steps=2, ds_n=2, ds_gauss_num=2, ds_lr=0.05)
for n in (4, 1):
    train("mnist", "lenet", f"{out}/d{n}", cfg, ocfg, data_dir=d, devices=n, progress=False, log=lambda s: None)
"""


def test_four_devices_equal_one_device(tmp_path):
    """The sigma table sharded over 4 forced CPU devices and on 1: the same table and weights after 5 steps."""
    import subprocess

    from tests._helpers_train import subprocess_env, write_mnist

    write_mnist(tmp_path / "mnist", n=40, seed=0, prefix="train")
    script = tmp_path / "run.py"
    script.write_text(DEVICES_SCRIPT)
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "mnist"), str(tmp_path)], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = np.load(tmp_path / "d4" / "sigma_train.npy"), np.load(tmp_path / "d1" / "sigma_train.npy")
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert np.abs(a - 0.25).max() > 1e-3
    from rsjax.classifier import load_classifier

    va = load_classifier(tmp_path / "d4" / "model", fold_bn=False, pack_narrow=False)[0].variables
    vb = load_classifier(tmp_path / "d1" / "model", fold_bn=False, pack_narrow=False)[0].variables
    for x, y in zip(jax.tree_util.tree_leaves(va), jax.tree_util.tree_leaves(vb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)
