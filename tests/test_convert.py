"""PyTorch -> Flax conversion: parity per architecture and per checkpoint format, the real
checkpoints' accuracies, loading in a fresh process, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402

import converters.torch_reference as R  # noqa: E402
from _helpers_convert import accuracy, cifar10_images, imagenet_crops, mnist_images, torch_logits  # noqa: E402
from converters.pytorch import (convert_checkpoint, detect_arch, normaliser_from_buffers,  # noqa: E402
                                read_checkpoint, sigma_from_path, strip_prefix, torch_to_flax)
from rsjax.classifier import load_classifier  # noqa: E402
from rsjax.errors import CheckpointError, RsjaxError  # noqa: E402
from rsjax.paths import REPO_ROOT  # noqa: E402

TOL = 1e-4


def _net(arch, num_classes, seed, normalizer=None, data_parallel=False, macer=False):
    """A random PyTorch reference net (random weights and BN statistics) and the model that
    is saved: ``Sequential(normalizer, [DataParallel](net))``, or the bare net for MACER."""
    torch.manual_seed(seed)
    net = R.build_net(arch, num_classes)
    model = net if macer else R.cohen_model(net, normalizer, data_parallel=data_parallel)
    x = imagenet_crops(4) if arch == "resnet50" else cifar10_images(64)[0][-32:] if arch != "lenet" else None
    calib = None if x is None else torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    R.randomize_batchnorm_(model, torch.Generator().manual_seed(seed + 1), calibrate=calib)
    return net.eval(), model.eval()


def _cifar_norm():
    return R.NormalizeLayer(R.CIFAR10_MEAN, R.CIFAR10_STD)


def _save(obj, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def _cohen_file(path, arch, model, legacy=False):
    """Cohen's train.py: {'epoch', 'arch', 'state_dict', 'optimizer'}."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    obj = {"epoch": 90, "arch": arch, "state_dict": model.state_dict(), "optimizer": opt.state_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def _logits(f, x):
    with jax.default_matmul_precision("highest"):
        return np.asarray(f(x))


def _convert(src, out, **kw):
    lines = []
    meta = convert_checkpoint(src, out, log=lines.append, **kw)
    return meta, lines


@pytest.fixture(scope="module")
def cifar_x():
    return cifar10_images(8)[0]


# ------------------------------------------------------------------------ parity per format

def test_cohen_resnet20_prefix_1(tmp_path, cifar_x):
    _, model = _net("cifar_resnet20", 10, 0, _cifar_norm())
    src = _cohen_file(tmp_path / "cifar10" / "resnet20" / "noise_0.12" / "checkpoint.pth.tar", "cifar_resnet20",
                      model, legacy=True)
    assert next(iter(model.state_dict())).startswith("1.conv1")
    meta, lines = _convert(src, tmp_path / "out")
    assert (meta["source_format"], meta["arch"], meta["dataset"], meta["normalization"], meta["sigma"]) == \
        ("cohen", "cifar_resnet20", "cifar10", "meanstd", 0.12)
    assert any("format: cohen" in ln for ln in lines) and any("arch: cifar_resnet20" in ln for ln in lines)
    f, meta2 = load_classifier(tmp_path / "out")
    on_disk = json.loads((tmp_path / "out" / "rsjax_model.json").read_text())
    assert {k: meta2[k] for k in on_disk} == on_disk  # plus how it was loaded:
    assert (meta2["dtype"], meta2["fold_bn"]) == ("float32", True)
    out = _logits(f, cifar_x)
    assert out.dtype == np.float32 and out.shape == (8, 10)
    np.testing.assert_allclose(out, torch_logits(model, cifar_x), atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def resnet110(tmp_path_factory):
    """A random ResNet-110 saved as Cohen's published CIFAR file (prefix 1.module.), converted."""
    d = tmp_path_factory.mktemp("r110")
    _, model = _net("cifar_resnet110", 10, 10, _cifar_norm(), data_parallel=True)
    src = _cohen_file(d / "models" / "cifar10" / "resnet110" / "noise_0.50" / "checkpoint.pth.tar",
                      "cifar_resnet110", model)
    assert len(model.state_dict()) == 668 and next(iter(model.state_dict())).startswith("1.module.")
    meta, _ = _convert(src, d / "out")
    x = cifar10_images(3)[0]
    return d / "out", meta, x, torch_logits(model, x)


def test_cohen_resnet110_prefix_1_module(resnet110):
    out_dir, meta, x, expected = resnet110
    assert (meta["arch"], meta["sigma"], meta["source_format"]) == ("cifar_resnet110", 0.5, "cohen")
    f, _ = load_classifier(out_dir)
    np.testing.assert_allclose(_logits(f, x), expected, atol=TOL, rtol=0)


def test_resnet110_loads_in_fresh_process(resnet110, tmp_path):
    out_dir, _, x, expected = resnet110
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, json, jax, numpy as np, rsjax\n"
            "f, meta = rsjax.load_classifier(sys.argv[1])\n"
            "with jax.default_matmul_precision('highest'):\n"
            "    y = np.asarray(jax.jit(f)(np.load(sys.argv[2])))\n"
            "print(json.dumps({'arch': meta['arch'], 'logits': y.tolist()}))\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code, str(out_dir), str(tmp_path / "x.npy")], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["arch"] == "cifar_resnet110"
    np.testing.assert_allclose(np.asarray(res["logits"]), expected, atol=TOL, rtol=0)


def test_macer_resnet_no_normalization(tmp_path, cifar_x):
    net, _ = _net("cifar_resnet20", 10, 20, macer=True)
    src = _save({"net": net.state_dict(), "epoch": 440}, tmp_path / "macer" / "0.50.pth")
    meta, lines = _convert(src, tmp_path / "out")
    assert (meta["source_format"], meta["normalization"], meta["sigma"]) == ("macer", "none", 0.5)
    assert meta["mean"] == [0.0] * 3 and meta["std"] == [1.0] * 3
    f, _ = load_classifier(tmp_path / "out")
    np.testing.assert_allclose(_logits(f, cifar_x), torch_logits(net, cifar_x), atol=TOL, rtol=0)


def test_smoothadv_input_center_layer(tmp_path, cifar_x):
    _, model = _net("cifar_resnet20", 10, 30, R.InputCenterLayer(R.CIFAR10_MEAN))
    src = _cohen_file(tmp_path / "PGD_2steps" / "eps_255" / "cifar10" / "resnet20" / "noise_0.25" / "checkpoint.pth.tar",
                      "cifar_resnet20", model)
    # auto: detected as SmoothAdv; the file cannot tell NormalizeLayer from InputCenterLayer -> warning
    meta, lines = _convert(src, tmp_path / "auto")
    assert meta["source_format"] == "smoothadv" and meta["normalization"] == "meanstd"
    assert any("InputCenterLayer" in ln and ln.startswith("warning") for ln in lines)
    meta, _ = _convert(src, tmp_path / "out", normalization="center")
    assert meta["normalization"] == "center" and meta["std"] == [1.0] * 3 and meta["mean"] == list(R.CIFAR10_MEAN)
    f, _ = load_classifier(tmp_path / "out")
    expected = torch_logits(model, cifar_x)
    np.testing.assert_allclose(_logits(f, cifar_x), expected, atol=TOL, rtol=0)
    f_wrong, _ = load_classifier(tmp_path / "auto")  # the documented trap: wrong normaliser
    assert np.abs(_logits(f_wrong, cifar_x) - expected).max() > 1e-2


def test_resnet50_torchvision_and_cohen_imagenet(tmp_path):
    net, model = _net("resnet50", 1000, 40, R.NormalizeLayer(R.IMAGENET_MEAN, R.IMAGENET_STD))
    x = imagenet_crops(2)
    assert x.shape == (2, 224, 224, 3)
    src = _save(net.state_dict(), tmp_path / "resnet50.pth")
    meta, _ = _convert(src, tmp_path / "tv")
    assert (meta["source_format"], meta["arch"], meta["dataset"], meta["normalization"], meta["input_shape"]) == \
        ("torchvision", "resnet50", "imagenet", "meanstd", [224, 224, 3])
    f, _ = load_classifier(tmp_path / "tv")
    expected = torch_logits(model, x)
    np.testing.assert_allclose(_logits(f, x), expected, atol=TOL, rtol=0)
    # Cohen's ImageNet file: Sequential(NormalizeLayer, DataParallel(resnet50)) -> prefix 1.module.
    model_dp = R.cohen_model(net, R.NormalizeLayer(R.IMAGENET_MEAN, R.IMAGENET_STD), data_parallel=True)
    src2 = _cohen_file(tmp_path / "imagenet" / "resnet50" / "noise_1.00" / "checkpoint.pth.tar", "resnet50", model_dp)
    meta2, _ = _convert(src2, tmp_path / "cohen")
    assert (meta2["source_format"], meta2["sigma"], meta2["mean"], meta2["std"]) == \
        ("cohen", 1.0, meta["mean"], meta["std"])
    f2, _ = load_classifier(tmp_path / "cohen")  # same arch and normalisation: shares f's compiled code
    assert f2.apply is f.apply and f2.variables is not f.variables
    np.testing.assert_allclose(_logits(f2, x), expected, atol=TOL, rtol=0)
    with jax.default_matmul_precision("highest"):  # weights passed explicitly
        np.testing.assert_allclose(np.asarray(jax.jit(f.apply)(f2.variables, x)), expected, atol=TOL, rtol=0)


def test_lenet_cohen_format(tmp_path):
    _, model = _net("lenet", 10, 50)
    src = _cohen_file(tmp_path / "mnist_lenet" / "checkpoint.pth.tar", "lenet", model)
    meta, _ = _convert(src, tmp_path / "out")
    assert (meta["arch"], meta["dataset"], meta["normalization"], meta["input_shape"]) == \
        ("lenet", "mnist", "none", [28, 28, 1])
    x = mnist_images(16)[0]
    f, _ = load_classifier(tmp_path / "out")
    np.testing.assert_allclose(_logits(f, x), torch_logits(model, x), atol=TOL, rtol=0)


def test_bfloat16_forward(tmp_path, cifar_x):
    net, _ = _net("cifar_resnet20", 10, 60, macer=True)
    src = _save({"net": net.state_dict(), "epoch": 1}, tmp_path / "1.00.pth")
    _convert(src, tmp_path / "out")
    f32, _ = load_classifier(tmp_path / "out")
    f16, _ = load_classifier(tmp_path / "out", dtype="bfloat16")
    a, b = _logits(f32, cifar_x), np.asarray(f16(cifar_x))
    assert b.dtype == np.float32
    scale = np.abs(a).max()
    assert 0 < np.abs(a - b).max() < 0.1 * scale  # bf16 really used, and close


# ------------------------------------------------------------------------ real checkpoints

REAL_CIFAR = [("cifar10_resnet20_noise0.25", 69.52, 0.25), ("cifar10_resnet20_noise0.50", 55.26, 0.5),
              ("cifar10_resnet20_noise1.00", 44.74, 1.0), ("cifar10_resnet20_clean", 89.77, None)]


@pytest.mark.parametrize("name,acc,sigma", REAL_CIFAR)
def test_real_cifar_checkpoints(shared_data, tmp_path, name, acc, sigma):
    meta, _ = _convert(shared_data / "models" / name / "checkpoint.pth.tar", tmp_path / "out")
    assert (meta["arch"], meta["dataset"], meta["normalization"], meta["sigma"]) == \
        ("cifar_resnet20", "cifar10", "meanstd", sigma)
    f, _ = load_classifier(tmp_path / "out")
    x, y = cifar10_images()
    assert len(x) == 1017
    got, _ = accuracy(f, x, y, batch=len(x))
    assert round(got, 2) == acc


def test_real_mnist_lenet(shared_data, tmp_path):
    meta, _ = _convert(shared_data / "models" / "mnist_lenet_noise0.25" / "checkpoint.pth.tar", tmp_path / "out")
    assert (meta["arch"], meta["dataset"], meta["sigma"]) == ("lenet", "mnist", 0.25)
    f, _ = load_classifier(tmp_path / "out")
    x, y = mnist_images()
    assert len(x) == 10000
    got, _ = accuracy(f, x, y, batch=len(x))
    assert round(got, 2) == 99.32


# ------------------------------------------------------------------------ detection units

def test_strip_prefix_variants():
    t = torch.zeros(1)
    for keys, prefix in [(["conv1.weight"], ""), (["1.conv1.weight"], "1."), (["1.module.conv1.weight"], "1.module."),
                         (["module.1.module.conv1.weight"], "module.1.module."), (["module.conv1.weight"], "module.")]:
        net, norm, p = strip_prefix({k: t for k in keys})
        assert (list(net), norm, p) == (["conv1.weight"], {}, prefix)
    net, norm, p = strip_prefix({"0.means": t, "0.sds": t, "1.fc.bias": t})
    assert list(net) == ["fc.bias"] and set(norm) == {"means", "sds"}
    with pytest.raises(CheckpointError, match="outside"):
        strip_prefix({"1.fc.bias": t, "fc.weight": t})
    m, sdv = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.2, 0.2])
    assert normaliser_from_buffers({"means": m, "sds": sdv}) == ("meanstd", m.tolist(), sdv.tolist())
    assert normaliser_from_buffers({"means": m}) == ("center", m.tolist(), [1.0] * 3)
    assert normaliser_from_buffers({}) is None


def test_sigma_from_path():
    assert sigma_from_path("models/cifar10/resnet110/noise_0.25/checkpoint.pth.tar") == 0.25
    assert sigma_from_path("x/cifar10_resnet20_noise1.00/checkpoint.pth.tar") == 1.0
    assert sigma_from_path("weights/0.50.pth") == 0.5
    assert sigma_from_path("x/clean/checkpoint.pth.tar") is None


def test_detect_arch_depth_from_blocks():
    for depth in (20, 110):
        sd = R.build_net(f"cifar_resnet{depth}", 10).state_dict()
        assert detect_arch(sd)[:2] == (f"cifar_resnet{depth}", 10)
    with pytest.raises(CheckpointError, match="unsupported architecture.*2, 2, 2, 2"):
        detect_arch(R.ResNet(R.BasicBlock, [2, 2, 2, 2], 10).state_dict())


def test_strict_mapping_names_keys():
    sd = R.build_net("cifar_resnet20", 10).state_dict()
    bad = dict(sd)
    bad["layer1.0.bn1.extra"] = torch.zeros(16)
    bad["fc.weight"] = torch.zeros(10, 32)
    del bad["layer3.2.bn2.running_var"]
    with pytest.raises(CheckpointError) as e:
        torch_to_flax(bad, "cifar_resnet20", 10)
    msg = str(e.value)
    assert "\n" not in msg
    assert "missing 1 key(s): layer3.2.bn2.running_var" in msg
    assert "unexpected 1 key(s): layer1.0.bn1.extra" in msg
    assert "fc.weight (10, 32) (expected (10, 64))" in msg
    v = torch_to_flax(sd, "cifar_resnet20", 10)  # every tensor used once
    n = sum(a.size for a in jax.tree_util.tree_leaves(v))
    assert n == sum(t.numel() for k, t in sd.items() if not k.endswith("num_batches_tracked"))


def test_read_checkpoint_allows_data_only_globals(tmp_path):
    import argparse

    sd = {"fc.bias": torch.zeros(3)}
    torch.save({"state_dict": sd, "best_acc": np.float64(91.5)}, tmp_path / "np.pth")
    notes = []
    obj = read_checkpoint(tmp_path / "np.pth", log=notes.append)  # numpy scalars: weights-only
    assert obj["best_acc"] == 91.5 and notes == []
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1, arch="cifar_resnet20")}, tmp_path / "ns.pth")
    obj = read_checkpoint(tmp_path / "ns.pth", log=notes.append)  # saved training arguments: weights-only too
    assert obj["args"].lr == 0.1 and notes == []
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty or truncated"):
        read_checkpoint(tmp_path / "empty.pth")


def test_convert_refuses_non_finite_tensors_naming_the_key(tmp_path):
    _, model = _net("cifar_resnet20", 10, 0, _cifar_norm())
    for key, value in (("layer2.1.conv1.weight", float("nan")), ("bn1.running_var", float("inf"))):
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        sd["1." + key].view(-1)[3] = value
        src = _save({"state_dict": sd, "arch": "cifar_resnet20"}, tmp_path / "cifar10" / "bad.pth")
        with pytest.raises(CheckpointError, match=f"tensor {key} has 1 non-finite"):
            convert_checkpoint(src, tmp_path / "out", log=lambda s: None)
        assert not (tmp_path / "out" / "rsjax_model.json").exists()
    # the same file without the bad value converts (the check is what refused it)
    src = _save({"state_dict": model.state_dict(), "arch": "cifar_resnet20"}, tmp_path / "cifar10" / "good.pth")
    convert_checkpoint(src, tmp_path / "out", log=lambda s: None)


def test_load_classifier_not_a_model(tmp_path):
    with pytest.raises(RsjaxError, match="not a converted rsjax model"):
        load_classifier(tmp_path)
    with pytest.raises(RsjaxError, match="no such model directory"):
        load_classifier(tmp_path / "nope")


# ------------------------------------------------------------------------ CLI errors

def _cli(*args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "rsjax", "convert", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    _, model = _net("cifar_resnet20", 10, 70, _cifar_norm())
    good = _cohen_file(d / "good.pth.tar", "cifar_resnet20", model)
    raw = good.read_bytes()
    (d / "truncated.pth.tar").write_bytes(raw[: len(raw) // 2])
    (d / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    r18 = R.cohen_model(R.ResNet(R.BasicBlock, [2, 2, 2, 2], 10), _cifar_norm())
    _cohen_file(d / "resnet18.pth.tar", "resnet18", r18)
    obj = torch.load(good, weights_only=True)
    del obj["state_dict"]["1.layer2.1.conv2.weight"]
    torch.save(obj, d / "missing.pth.tar")
    return d


@pytest.mark.parametrize("name,pattern", [
    ("truncated.pth.tar", "truncated or corrupted"),
    ("random.pth", "not a PyTorch checkpoint"),
    ("resnet18.pth.tar", "unsupported architecture"),
    ("missing.pth.tar", "missing 1 key(s): layer2.1.conv2.weight"),
])
def test_cli_bad_input_one_line(bad_files, tmp_path, name, pattern):
    r = _cli(bad_files / name, tmp_path / "out", cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("rsjax convert: error: ") and pattern in lines[0]
    assert not (tmp_path / "out" / "rsjax_model.json").exists()


def test_arch_and_format_must_fit(bad_files, tmp_path):
    src = bad_files / "good.pth.tar"
    with pytest.raises(CheckpointError, match="--arch cifar_resnet110 does not fit.*cifar_resnet20"):
        convert_checkpoint(src, tmp_path / "a", arch="cifar_resnet110", log=lambda s: None)
    with pytest.raises(CheckpointError, match="--format macer does not fit"):
        convert_checkpoint(src, tmp_path / "b", fmt="macer", log=lambda s: None)
    obj = torch.load(src, weights_only=True)
    obj["arch"] = "cifar_resnet110"
    torch.save(obj, tmp_path / "lying.pth.tar")
    with pytest.raises(CheckpointError, match="says arch 'cifar_resnet110' but its tensors are those of cifar_resnet20"):
        convert_checkpoint(tmp_path / "lying.pth.tar", tmp_path / "c", log=lambda s: None)
    assert not any((tmp_path / d).exists() for d in "abc")


def test_cli_converts_and_refuses_overwrite(bad_files, tmp_path, capsys):
    from rsjax.cli import main

    src, out = str(bad_files / "good.pth.tar"), str(tmp_path / "out")
    assert main(["convert", src, out]) == 0
    captured = capsys.readouterr().out
    assert "arch: cifar_resnet20" in captured and "format: cohen" in captured
    assert main(["convert", src, out]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert main(["convert", src, out, "--overwrite", "--sigma", "0.3"]) == 0
    assert json.loads((tmp_path / "out" / "rsjax_model.json").read_text())["sigma"] == 0.3
