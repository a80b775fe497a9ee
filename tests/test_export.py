"""``rsjax export``: the PyTorch reference networks compute rsjax's logits; converting back is lossless."""

import jax
import numpy as np
import pytest
import torch

from converters.export import export_checkpoint
from converters.pytorch import convert_checkpoint
from converters.torch_reference import CIFAR10_MEAN, CIFAR10_STD, NormalizeLayer, build_net, cohen_model
from rsjax.classifier import load_classifier, save_classifier
from rsjax.cli import main
from rsjax.errors import RsjaxError
from rsjax.training.trainer import init_variables


def random_model(tmp_path, arch, dataset, norm):
    """An rsjax model with random weights and random BatchNorm statistics (so a mixed-up export fails)."""
    variables = init_variables(arch, 10, 0, None)
    rng = np.random.default_rng(1)
    variables = jax.tree_util.tree_map(lambda a: (a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32), variables)
    if "batch_stats" in variables:
        variables["batch_stats"] = jax.tree_util.tree_map(
            lambda a: np.abs(a).astype(np.float32) + 0.5 if a.ndim else a, variables["batch_stats"])
    c = 1 if dataset == "mnist" else 3
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if norm == "meanstd" else ((0.0,) * c, (1.0,) * c)
    out = tmp_path / f"{arch}_{norm}"
    save_classifier(out, variables, {"arch": arch, "dataset": dataset, "num_classes": 10,
                                     "input_shape": [28, 28, 1] if c == 1 else [32, 32, 3], "mean": list(mean),
                                     "std": list(std), "sigma": 0.25, "training": {"epochs": 7, "steps": 70}})
    return out, variables


@pytest.mark.parametrize("arch,dataset,norm,fmt", [("cifar_resnet20", "cifar10", "meanstd", "cohen"),
                                                   ("cifar_resnet20", "cifar10", "none", "macer"),
                                                   ("lenet", "mnist", "none", "cohen")])
def test_export_loads_into_the_reference_network_and_converts_back(tmp_path, arch, dataset, norm, fmt):
    src, variables = random_model(tmp_path, arch, dataset, norm)
    pth = tmp_path / "out.pth.tar"
    export_checkpoint(src, pth, fmt)
    obj = torch.load(pth, map_location="cpu", weights_only=True)
    net = build_net(arch, 10)
    if fmt == "cohen":
        assert set(obj) == {"epoch", "arch", "state_dict"} and obj["epoch"] == 7 and obj["arch"] == arch
        model = cohen_model(net, NormalizeLayer(CIFAR10_MEAN, CIFAR10_STD) if norm == "meanstd" else None)
        model.load_state_dict(obj["state_dict"], strict=True)
    else:
        assert set(obj) == {"net", "epoch"}
        net.load_state_dict(obj["net"], strict=True)
        model = net
    model.eval()
    f, _ = load_classifier(src, fold_bn=False, pack_narrow=False)
    shape = (6, 28, 28, 1) if arch == "lenet" else (6, 32, 32, 3)
    x = np.random.default_rng(2).random(shape, dtype=np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(np.array(np.transpose(x, (0, 3, 1, 2)), order="C"))).numpy()
    np.testing.assert_allclose(np.asarray(f(x)), ref, atol=1e-4, rtol=1e-4)
    back = tmp_path / "back"
    convert_checkpoint(pth, back, fmt=fmt, dataset=dataset, log=lambda s: None)
    g, meta = load_classifier(back, fold_bn=False, pack_narrow=False)
    for a, b in zip(jax.tree_util.tree_leaves(dict(f.variables)), jax.tree_util.tree_leaves(dict(g.variables))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert meta["normalization"] == norm


def test_export_refuses_a_layout_that_would_change_the_function(tmp_path, capsys):
    src, _ = random_model(tmp_path, "cifar_resnet20", "cifar10", "meanstd")
    with pytest.raises(RsjaxError, match="--format macer has no normaliser"):
        export_checkpoint(src, tmp_path / "a.pth", "macer")
    plain, _ = random_model(tmp_path, "cifar_resnet20", "cifar10", "none")
    with pytest.raises(RsjaxError, match="--format cohen implies meanstd normalisation on cifar10"):
        export_checkpoint(plain, tmp_path / "a.pth", "cohen")
    (tmp_path / "exists.pth").write_bytes(b"mine")
    assert main(["export", str(src), str(tmp_path / "exists.pth")]) == 2
    assert "exists (pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "exists.pth").read_bytes() == b"mine"
    assert not (tmp_path / "a.pth").exists()


def test_init_from_a_pytorch_checkpoint_is_the_converted_model(shared_data, tmp_path):
    """--init with the real Cohen-format LeNet: the same variables as `rsjax convert` (weights-only load)."""
    ckpt = shared_data / "models" / "mnist_lenet_noise0.25" / "checkpoint.pth.tar"
    got = init_variables("lenet", 10, 0, str(ckpt))
    convert_checkpoint(ckpt, tmp_path / "conv", log=lambda s: None)
    f, _ = load_classifier(tmp_path / "conv", fold_bn=False, pack_narrow=False)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(dict(f.variables))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(RsjaxError, match="a lenet with 10 classes, but this run trains a cifar_resnet20"):
        init_variables("cifar_resnet20", 10, 0, str(ckpt))
