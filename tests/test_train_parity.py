"""One Gaussian-augmentation step and one MACER step in rsjax = the references' steps in PyTorch.

Same weights (a CIFAR ResNet-8 of Cohen's layout with random BatchNorm state, and LeNet), same
batch, same noise (rsjax's, handed to PyTorch in place of ``randn_like``), ``torch.optim.SGD`` with
momentum and weight decay, two steps (so momentum matters). The PyTorch side is the references'
loop body: locuslab/smoothing ``code/train.py`` ``train()``, RuntianZ/macer ``macer.py``
``macer_train()``.
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util
from jax.sharding import Mesh
from torch.distributions.normal import Normal

from converters.pytorch import _to_flax_layout, flax_path_to_torch_key
from converters.torch_reference import CIFAR10_MEAN, CIFAR10_STD, LeNet, NormalizeLayer, cifar_resnet
from converters.torch_reference import randomize_batchnorm_
from rsjax.models.lenet import LeNet as FlaxLeNet
from rsjax.models.resnet import BasicBlock, ResNet
from rsjax.training import step as S
from rsjax.training.objectives import MacerConfig, example_keys, get_objective, per_example_normal

LR, MOMENTUM, WD, SIGMA, SEED = 0.1, 0.9, 1e-4, 0.25, 3


def flax_from_torch(net, flax_model, shape):
    target = jax.eval_shape(lambda: flax_model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape)))
    sd = net.state_dict()
    flat = {p: _to_flax_layout(sd[flax_path_to_torch_key(p)].detach().numpy(), p[-1]).astype(np.float32)
            for p in traverse_util.flatten_dict(dict(target))}
    return traverse_util.unflatten_dict(flat)


def assert_same_variables(variables, net, rtol=1e-5, atol=1e-6):
    sd = net.state_dict()
    for p, a in traverse_util.flatten_dict(dict(variables)).items():
        ref = _to_flax_layout(sd[flax_path_to_torch_key(p)].detach().numpy(), p[-1])
        # relative to the tensor's scale: float32 sums in another order differ by ~1e-6 of it, which is
        # far more than 1e-5 of an element near zero
        np.testing.assert_allclose(np.asarray(a), ref, rtol=rtol, atol=max(atol, rtol * float(np.abs(ref).max())),
                                   err_msg="/".join(p))


def rsjax_steps(flax_model, variables, method, obj_cfg, batches, mean, std, kernels="xla", epoch=0):
    obj = get_objective(method)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    apply = functools.partial(S.train_apply, flax_model, np.asarray(mean, np.float32), np.asarray(std, np.float32),
                              onednn=kernels == "onednn", mesh=mesh)
    tx = S.make_optimizer(lr=LR, schedule="constant", gamma=0.1, epochs=1, steps_per_epoch=10, momentum=MOMENTUM,
                          weight_decay=WD)
    params, bs = variables["params"], variables.get("batch_stats", {})
    if kernels == "onednn":  # the step really runs oneDNN's convolutions (no silent fallback)
        assert "rsjax_onednn_conv_train" in str(jax.make_jaxpr(lambda p: apply(p, bs, batches[0]["x"]))(params))
    names = S.metric_names(obj, obj_cfg, apply, num_classes=10, x_shape=batches[0]["x"].shape, example_state={},
                           params=params, batch_stats=bs)
    state = S.TrainState(params=params, batch_stats=bs, opt_state=tx.init(params), example_state={},
                         sums=S.zero_sums(names), step=jnp.int32(0))
    state = jax.device_put(state, S.state_shardings(mesh, state))  # committed, as the trainer's: one compilation
    step = S.make_train_step(obj, obj_cfg, tx, apply, mesh, state, seed=SEED, sigma=SIGMA, num_classes=10)
    losses = []
    for b in batches:
        state, sums = step(state, jax.device_put(b, S.batch_sharding(mesh)), np.int32(epoch))
        losses.append(float(sums["loss"]) / len(b["y"]))
    out = {"params": state.params}
    if bs:
        out["batch_stats"] = state.batch_stats
    return losses, jax.device_get(out)


def noise_nchw(idx, shape):
    """rsjax's per-example noise eps (B, *shape) in NHWC, as an NCHW torch tensor."""
    eps = np.asarray(per_example_normal(example_keys(SEED, jnp.asarray(idx), 0), shape))
    return torch.from_numpy(np.array(np.moveaxis(eps, -1, -3), order="C"))


def make_batches(shape, n=2, b=8):
    rng = np.random.default_rng(0)
    return [{"x": rng.random((b,) + shape, dtype=np.float32), "y": rng.integers(0, 10, b).astype(np.int32),
             "idx": np.arange(b, dtype=np.int32) + 100 * s, "row": np.arange(b, dtype=np.int32)} for s in range(n)]


def to_nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def torch_cohen_steps(model, batches, shape):
    """locuslab/smoothing code/train.py train(): the loop body, noise given instead of randn_like."""
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    model.train()
    losses = []
    for b in batches:
        inputs, targets = to_nchw(b["x"]), torch.from_numpy(b["y"].astype(np.int64))
        # augment inputs with noise
        inputs = inputs + noise_nchw(b["idx"], shape) * SIGMA
        # compute output
        outputs = model(inputs)
        loss = criterion(outputs, targets)
        losses.append(loss.item())
        # compute gradient and do SGD step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses


def torch_macer_steps(model, batches, shape, sigma, lbd, gauss_num, beta, gamma, num_classes=10, epoch=0):
    """RuntianZ/macer macer.py macer_train(): the loop body, noise given instead of randn_like."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    model.train()
    m = Normal(torch.tensor([0.0]), torch.tensor([1.0]))
    losses, kept = [], []
    for b in batches:
        inputs, targets = to_nchw(b["x"]), torch.from_numpy(b["y"].astype(np.int64))
        input_size = len(inputs)
        new_shape = [input_size * gauss_num]
        new_shape.extend(inputs[0].shape)
        inputs = inputs.repeat((1, gauss_num, 1, 1)).view(new_shape)
        eps = np.asarray(per_example_normal(example_keys(SEED, jnp.asarray(b["idx"]), epoch), (gauss_num,) + shape))
        noise = torch.from_numpy(np.array(np.moveaxis(eps, -1, -3), order="C")).reshape(new_shape) * sigma
        noisy_inputs = inputs + noise

        outputs = model(noisy_inputs)
        outputs = outputs.reshape((input_size, gauss_num, num_classes))

        # Classification loss
        outputs_softmax = F.softmax(outputs, dim=2).mean(1)
        outputs_logsoftmax = torch.log(outputs_softmax + 1e-10)  # avoid nan
        classification_loss = F.nll_loss(outputs_logsoftmax, targets, reduction='sum')

        # Robustness loss
        beta_outputs = outputs * beta  # only apply beta to the robustness loss
        beta_outputs_softmax = F.softmax(beta_outputs, dim=2).mean(1)
        top2 = torch.topk(beta_outputs_softmax, 2)
        top2_score = top2[0]
        top2_idx = top2[1]
        indices_correct = (top2_idx[:, 0] == targets)  # G_theta

        out0, out1 = top2_score[indices_correct, 0], top2_score[indices_correct, 1]
        robustness_loss = m.icdf(out1) - m.icdf(out0)
        indices = ~torch.isnan(robustness_loss) & ~torch.isinf(robustness_loss) & (
            torch.abs(robustness_loss) <= gamma)  # hinge
        out0, out1 = out0[indices], out1[indices]
        kept.append((int(indices.sum()), int(len(indices))))
        robustness_loss = m.icdf(out1) - m.icdf(out0) + gamma
        robustness_loss = robustness_loss.sum() * sigma / 2

        # Final objective function
        loss = classification_loss + lbd * robustness_loss
        loss /= input_size
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses, kept


def resnet8():
    torch.manual_seed(0)
    net = cifar_resnet(8)
    randomize_batchnorm_(net, generator=torch.Generator().manual_seed(1))
    flax_model = ResNet(stage_sizes=(1, 1, 1), block_cls=BasicBlock, num_classes=10, num_filters=16, stem="cifar")
    return net, flax_model


def _kernels():
    """XLA's convolutions, and oneDNN's (rsjax.kernels.onednn_train) where the extension loads."""
    from rsjax.kernels.onednn_train import load

    ok, reason = load()
    return ["xla", pytest.param("onednn", marks=pytest.mark.skipif(not ok, reason=f"oneDNN: {reason}"))]


@pytest.mark.parametrize("kernels", _kernels())
def test_gaussian_step_matches_cohen_train_py(kernels):
    net, flax_model = resnet8()
    variables = flax_from_torch(net, flax_model, (32, 32, 3))
    batches = make_batches((32, 32, 3))
    model = torch.nn.Sequential(NormalizeLayer(CIFAR10_MEAN, CIFAR10_STD), net)
    ref_losses = torch_cohen_steps(model, batches, (32, 32, 3))
    losses, out = rsjax_steps(flax_model, variables, "gaussian", get_objective("gaussian").config(), batches,
                              CIFAR10_MEAN, CIFAR10_STD, kernels)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
    assert_same_variables(out, net)


def test_running_variance_needs_the_unbiased_correction(monkeypatch):
    """Negative control: with Flax's biased running variance the comparison above fails."""
    net, flax_model = resnet8()
    variables = flax_from_torch(net, flax_model, (32, 32, 3))
    batches = make_batches((32, 32, 3), n=1)
    torch_cohen_steps(torch.nn.Sequential(NormalizeLayer(CIFAR10_MEAN, CIFAR10_STD), net), batches, (32, 32, 3))
    monkeypatch.setattr(S, "unbiased_running_var", lambda old, new, sizes: new)
    _, out = rsjax_steps(flax_model, variables, "gaussian", get_objective("gaussian").config(), batches,
                         CIFAR10_MEAN, CIFAR10_STD)
    with pytest.raises(AssertionError, match="var"):
        assert_same_variables(out, net)


@pytest.mark.parametrize("kernels", _kernels())
@pytest.mark.parametrize("arch", ["resnet8", "lenet"])
def test_macer_step_matches_macer_py(arch, kernels):
    if arch == "lenet":
        torch.manual_seed(0)
        net, flax_model, shape = LeNet(), FlaxLeNet(num_classes=10), (28, 28, 1)
    else:
        (net, flax_model), shape = resnet8(), (32, 32, 3)
    variables = flax_from_torch(net, flax_model, shape)
    batches = make_batches(shape)
    with torch.no_grad():  # most labels = the net's clean prediction, so the robustness term has samples
        net.eval()
        for b in batches:
            b["y"][:6] = net(to_nchw(b["x"])).argmax(1).numpy()[:6]
    cfg = MacerConfig(gauss_num=4, lbd=12.0, gamma=8.0, beta=16.0)
    ref_losses, kept = torch_macer_steps(net, batches, shape, SIGMA, cfg.lbd, cfg.gauss_num, cfg.beta, cfg.gamma)
    assert sum(k for k, _ in kept) > 0, kept  # the hinge term is exercised
    losses, out = rsjax_steps(flax_model, variables, "macer", cfg, batches, (0.0,) * shape[-1], (1.0,) * shape[-1],
                              kernels)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
    assert_same_variables(out, net)


def test_macer_lambda_warmup_is_the_deferred_reference_step():
    """--lbd-warmup-epochs E: epochs < E are MACER's step with lambda 0 (smoothing-consistency's
    train_macer.py --deferred), epoch E on the step with lambda; the control: the two differ."""
    torch.manual_seed(0)
    net, flax_model, shape = LeNet(), FlaxLeNet(num_classes=10), (28, 28, 1)
    variables = flax_from_torch(net, flax_model, shape)
    batches = make_batches(shape)
    with torch.no_grad():
        for b in batches:
            b["y"][:6] = net(to_nchw(b["x"])).argmax(1).numpy()[:6]
    cfg = MacerConfig(gauss_num=4, lbd=12.0, gamma=8.0, beta=16.0, lbd_warmup_epochs=2)
    args = (batches, shape, SIGMA)
    net0, net12 = copy.deepcopy(net), copy.deepcopy(net)
    ref0, _ = torch_macer_steps(net0, *args, 0.0, cfg.gauss_num, cfg.beta, cfg.gamma, epoch=1)
    ref12, kept = torch_macer_steps(net12, *args, cfg.lbd, cfg.gauss_num, cfg.beta, cfg.gamma, epoch=2)
    assert sum(k for k, _ in kept) > 0, kept
    mean, std = (0.0,), (1.0,)
    warm, out_warm = rsjax_steps(flax_model, variables, "macer", cfg, batches, mean, std, epoch=1)
    after, out_after = rsjax_steps(flax_model, variables, "macer", cfg, batches, mean, std, epoch=2)
    np.testing.assert_allclose(warm, ref0, atol=1e-5)
    np.testing.assert_allclose(after, ref12, atol=1e-5)
    assert_same_variables(out_warm, net0)
    assert_same_variables(out_after, net12)
    assert np.abs(np.asarray(ref12) - np.asarray(ref0)).max() > 1e-2  # the hinge term counts


def test_torch_reference_macer_loss_is_macer_py():
    """converters.torch_reference.macer_loss (used by benchmarks/ and scripts/macer_torch_reference.py)
    is the loss of macer.py's loop body on the same batch and noise; control: lambda 0 differs."""
    from converters.torch_reference import macer_loss

    torch.manual_seed(0)
    net, shape = LeNet(), (28, 28, 1)
    batches = make_batches(shape, n=1)
    with torch.no_grad():
        b = batches[0]
        b["y"][:6] = net(to_nchw(b["x"])).argmax(1).numpy()[:6]
    k = 4
    noise = noise_nchw(b["idx"], (k,) + shape).reshape((len(b["y"]) * k,) + (1, 28, 28))
    targets = torch.from_numpy(b["y"].astype(np.int64))
    net.train()
    with torch.no_grad():
        loss, _, lr, _ = macer_loss(copy.deepcopy(net), to_nchw(b["x"]), targets, noise, sigma=SIGMA, lbd=12.0)
        loss0 = macer_loss(copy.deepcopy(net), to_nchw(b["x"]), targets, noise, sigma=SIGMA, lbd=0.0)[0]
    ref, kept = torch_macer_steps(net, batches, shape, SIGMA, 12.0, k, 16.0, 8.0)
    assert kept[0][0] > 0 and float(lr) > 0
    np.testing.assert_allclose(float(loss), ref[0], rtol=1e-6)
    assert abs(float(loss0) - ref[0]) > 1e-3
