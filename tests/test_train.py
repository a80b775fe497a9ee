"""``rsjax train`` end to end: data, determinism, exact resume after SIGKILL, devices, bad input."""

import json
import subprocess

import jax
import numpy as np
import pandas as pd
import pytest

from rsjax.cli import main
from rsjax.errors import DataError, RsjaxError
from rsjax.training.data import Pipeline, crop_flip, load_train_data
from rsjax.training.trainer import TrainConfig, train
from tests._helpers_train import kill_mid_epoch, rsjax_cmd, subprocess_env, write_cifar, write_idx, write_mnist


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mnist")
    write_mnist(d, n=192, seed=0, prefix="train")
    write_mnist(d, n=64, seed=1, prefix="t10k")
    return d


def model_variables(outdir):
    from rsjax.classifier import load_classifier

    f, meta = load_classifier(outdir / "model", fold_bn=False, pack_narrow=False)
    return jax.tree_util.tree_map(np.asarray, dict(f.variables)), meta


def rows_without_time(path, drop=("time",)):
    df = pd.read_csv(path, delimiter="\t")
    return df.drop(columns=list(drop))


# ----------------------------------------------------------------------------- data


def test_cifar_train_batches_crop_flip_and_determinism(tmp_path):
    write_cifar(tmp_path, per_batch=6)
    data = load_train_data("cifar10", "train", tmp_path)
    assert len(data) == 30 and data.images.shape == (30, 32, 32, 3)
    x1, y1 = data.get([0, 5, 29], epoch=3, seed=7)
    x2, _ = data.get([0, 5, 29], epoch=3, seed=7)
    x3, _ = data.get([0, 5, 29], epoch=4, seed=7)
    np.testing.assert_array_equal(x1, x2)
    assert not np.array_equal(x1, x3)
    np.testing.assert_array_equal(y1, data.labels[[0, 5, 29]])
    # crop_flip is RandomCrop(32, padding=4) + flip: check one example by hand
    img = data.images[:1]
    out = crop_flip(img, np.array([[1, 7]]), np.array([True]))
    ref = np.pad(img[0], ((4, 4), (4, 4), (0, 0)))[1:33, 7:39][:, ::-1]
    np.testing.assert_array_equal(out[0], ref)


def test_mnist_idx_train_files_subset_and_bad_files(tmp_path):
    x, y = write_mnist(tmp_path, n=40, prefix="train")
    data = load_train_data("mnist", "train", tmp_path, "10:30")
    assert len(data) == 20 and list(data.idx[:2]) == [10, 11]
    xb, yb = data.get([0], epoch=0, seed=0)  # MNIST: no augmentation
    np.testing.assert_allclose(xb[0, :, :, 0], x[10] / 255, atol=1e-7)
    with pytest.raises(RsjaxError, match="--subset '30:50'.*40"):
        load_train_data("mnist", "train", tmp_path, "30:50")
    bad = tmp_path / "bad"
    write_mnist(bad, n=12, prefix="train", labels=[1] * 11 + [12])
    with pytest.raises(DataError, match="label 12 of image 11 is out of range 0..9"):
        load_train_data("mnist", "train", bad)
    trunc = tmp_path / "trunc"
    write_mnist(trunc, n=12, prefix="train")
    raw = (trunc / "train-images-idx3-ubyte.gz").read_bytes()
    import gzip

    (trunc / "train-images-idx3-ubyte.gz").unlink()
    (trunc / "train-images-idx3-ubyte").write_bytes(gzip.decompress(raw)[:-100])
    with pytest.raises(DataError, match="truncated"):
        load_train_data("mnist", "train", trunc)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="data_batch_1"):
        load_train_data("cifar10", "train", empty)


def test_process_shares_make_the_global_batch(tmp_path):
    write_cifar(tmp_path, per_batch=11)
    data = load_train_data("cifar10", "train", tmp_path)
    one = Pipeline(data, batch=12, seed=1, num_devices=4)
    two = [Pipeline(data, batch=12, seed=1, num_devices=4, process_index=k, process_count=2) for k in range(2)]
    assert one.steps_per_epoch == 5  # 4 full batches of 12, then the last 7 rows cut to 4 (a multiple of 4 devices)
    for step in (0, 3, 4, 7):
        g = one.local(step)
        parts = [p.local(step) for p in two]
        for k in g:
            np.testing.assert_array_equal(g[k], np.concatenate([p[k] for p in parts]))
    assert len(one.local(4)["y"]) == 4
    seen = np.concatenate([one.local(s)["row"] for s in range(5)])
    assert len(set(seen)) == len(seen) == 52
    assert not np.array_equal(one.local(0)["row"], one.local(5)["row"])  # each epoch its own order


# ----------------------------------------------------------------------------- runs


@pytest.mark.parametrize("kernels", ["auto", "xla"])
def test_resume_after_sigkill_is_bit_identical(mnist_dir, tmp_path, kernels):
    """auto (the default: oneDNN's convolutions wherever the extension loads) and XLA's (GPU and fallback)."""
    common = ["train", "mnist", "lenet", None, "--data-dir", mnist_dir, "--epochs", "3", "--batch", "8", "--lr", "0.05",
              "--checkpoint-every-steps", "5", "--test-split", "test", "--quiet", "--cpu-kernels", kernels]
    env = subprocess_env()

    def cmd(out):
        return rsjax_cmd(*[out if a is None else a for a in common])

    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(cmd(full), env=env, check=True, capture_output=True)
    # a mid-epoch checkpoint (24 steps per epoch)
    killed_at = kill_mid_epoch(cmd(killed), killed, env, lambda s: s % 24 != 0)
    assert killed_at is not None and killed_at < 72, "the run ended before it could be killed mid-epoch"
    resumed = subprocess.run(cmd(killed), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    a, meta = model_variables(full)
    b, meta_killed = model_variables(killed)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert meta["training"]["epochs"] == 3 and meta["sigma"] == 0.25 and meta["arch"] == "lenet"
    pd.testing.assert_frame_equal(rows_without_time(full / "log.txt"), rows_without_time(killed / "log.txt"))
    rows = [json.loads(ln) for ln in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    # the default --cpu-kernels auto ran oneDNN's convolutions wherever the extension loads (bit-identical
    # resume included: its training primitives are created deterministic), else XLA's
    from rsjax.kernels.onednn_train import load

    expected = "onednn" if kernels == "auto" and load()[0] else "xla"
    assert meta["training"]["kernels"] == expected and {r["kernels"] for r in rows} == {expected}
    assert meta["training"]["initialisation"] == "rsjax.models.init"
    # the resumed run says where its weights started when an epoch's model before the kill recorded it
    # (certainly so after a checkpoint of step >= 24: the epoch's model is written before it)
    assert meta_killed["training"]["initialisation"] in ("rsjax.models.init", "unknown")
    if killed_at >= 24:
        assert meta_killed["training"]["initialisation"] == "rsjax.models.init"
    assert (full / "curves.png").stat().st_size > 1000
    # the trained model learned the band task (a real signal, not a constant)
    log = pd.read_csv(full / "log.txt", delimiter="\t")
    assert list(log.columns) == ["epoch", "time", "lr", "train loss", "train acc", "testloss", "test acc"]
    assert log["train loss"].iloc[-1] < log["train loss"].iloc[0]
    # a negative control: another seed gives other weights
    other = tmp_path / "other"
    subprocess.run(cmd(other) + ["--seed", "1", "--epochs", "1"], env=env, check=True, capture_output=True)
    c, _ = model_variables(other)
    assert not np.array_equal(jax.tree_util.tree_leaves(a)[0], jax.tree_util.tree_leaves(c)[0])


DEVICES_SCRIPT = r"""
import sys, json, numpy as np, jax
from rsjax.training.trainer import TrainConfig, train
from rsjax.errors import RsjaxError
d, out = sys.argv[1], sys.argv[2]
assert jax.local_device_count() == 4
cfg = TrainConfig(method=sys.argv[3], epochs=1, batch=8, lr=0.001, test_split="none", subset="0:40")
from rsjax.training.objectives import get_objective
ocfg = get_objective(sys.argv[3]).config(**({"gauss_num": 2} if sys.argv[3] == "macer" else {}))
for n in (4, 1):
    train("cifar10", "cifar_resnet20", f"{out}/d{n}", cfg, ocfg, data_dir=d, devices=n, progress=False, log=lambda s: None)
try:
    train("cifar10", "cifar_resnet20", f"{out}/bad", TrainConfig(batch=6, epochs=1), data_dir=d, progress=False)
except RsjaxError as e:
    print("ERROR", e)
"""


@pytest.mark.parametrize("method", ["gaussian"])
def test_four_devices_equal_one_device(tmp_path, method):
    """Same global batch and keys on 4 devices and on 1: the same weights after 5 steps (BatchNorm over
    the global batch), lr 0.001. The step size is small because float32 rounding differences (the all-reduce sums
    in another order) grow with it: at lr 0.01 on batch 8 they reach 1e-4 after 5 steps. (MACER's kept set is
    a discrete choice that such differences can flip on random data; its 4-device step was checked equal
    on a fixed batch.)"""
    write_cifar(tmp_path, per_batch=8)
    script = tmp_path / "run.py"
    script.write_text(DEVICES_SCRIPT)
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    r = subprocess.run(["python", str(script), str(tmp_path), str(tmp_path), method], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ERROR --batch 6 is not divisible by the 4 devices" in r.stdout
    assert not (tmp_path / "bad").exists()
    a, _ = model_variables(tmp_path / "d4")
    b, _ = model_variables(tmp_path / "d1")
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    for (path, x), y in zip(flat_a, jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    moved = np.abs(a["params"]["fc"]["kernel"] - model_variables_init(tmp_path)["params"]["fc"]["kernel"]).max()
    assert moved > 5e-5  # five steps really trained


def model_variables_init(tmp_path):
    from rsjax.training.trainer import init_variables

    return init_variables("cifar_resnet20", 10, 0, None)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_writes_nothing(mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "mnist", "lenet", str(out), "--data-dir", str(mnist_dir), "--epochs", "1", "--quiet"]
    cases = [
        (["--method", "nope"], "unknown training method 'nope'"),
        (["--sigma", "0"], "--sigma must be > 0"),
        (["--preset", "cohen-mnist"], "unknown preset 'cohen-mnist'"),
        (["--preset", "cohen-cifar10"], "--preset cohen-cifar10 is for cifar10, not mnist"),
        (["--gauss-num", "4"], "--gauss-num belong(s) to --method macer, not gaussian"),
        (["--lr-schedule", "steps"], "--lr-schedule 'steps'"),
        (["--subset", "5:1"], "--subset '5:1'"),
    ]
    for extra, msg in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("rsjax train: error: ") and msg in err and len(err.splitlines()) == 1, err
        assert not out.exists()
    assert main(["train", "mnist", "resnet99", str(out)]) == 2
    assert "unknown architecture 'resnet99'" in capsys.readouterr().err
    # --init of another architecture
    other = tmp_path / "rn20"
    from rsjax.classifier import save_classifier
    from rsjax.training.trainer import init_variables

    save_classifier(other, init_variables("cifar_resnet20", 10, 0, None),
                    {"arch": "cifar_resnet20", "dataset": "cifar10", "num_classes": 10, "input_shape": [32, 32, 3],
                     "mean": [0.0] * 3, "std": [1.0] * 3})
    assert main(base + ["--init", str(other)]) == 2
    assert "a cifar_resnet20 with 10 classes, but this run trains a lenet" in capsys.readouterr().err
    assert not out.exists()
    # an OUTDIR with someone else's files
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(base) == 2
    assert "holds no rsjax train run" in capsys.readouterr().err
    assert main(base + ["--overwrite"]) == 2
    assert (out / "notes.txt").read_text() == "mine"


def test_macer_preset_resolves_and_records_settings(mnist_dir):
    from rsjax.cli import build_parser
    from rsjax.cli.train import config_from

    args = build_parser(["train"]).parse_args(["train", "mnist", "lenet", "x", "--preset", "macer-mnist", "--lbd", "4"])
    cfg, ocfg = config_from(args)
    assert (cfg.method, cfg.epochs, cfg.batch, cfg.lr, cfg.weight_decay, cfg.lr_schedule) == \
        ("macer", 440, 64, 0.01, 5e-4, "multistep:199,399")
    assert (ocfg.gauss_num, ocfg.lbd, ocfg.gamma, ocfg.beta) == (16, 4.0, 8.0, 16.0)
    from rsjax.training.step import lr_at_epoch

    # MACER's MultiStepLR([200, 400]) stepped before each 1-based epoch: 0.01 for epochs 1-199 ...
    lrs = [float(lr_at_epoch(e - 1, lr=0.01, schedule=cfg.lr_schedule, gamma=0.1, epochs=440)) for e in (199, 200, 399, 400)]
    np.testing.assert_allclose(lrs, [0.01, 0.001, 0.001, 0.0001], rtol=1e-6)
    # Cohen's StepLR(30, 0.1) stepped with the 0-based epoch
    np.testing.assert_allclose([float(lr_at_epoch(e, lr=0.1, schedule="step:30", gamma=0.1, epochs=90))
                                for e in (0, 29, 30, 89)], [0.1, 0.1, 0.01, 0.001], rtol=1e-6)


def test_outdir_of_other_settings_is_refused_and_kept(tmp_path):
    from rsjax.training.trainer import SETTINGS_FILE, prepare_outdir

    out = tmp_path / "run"
    out.mkdir()
    old = {"dataset": "mnist", "batch": 64, "lr": 0.01, "epochs": 5}
    (out / SETTINGS_FILE).write_text(json.dumps(old))
    (out / "log.txt").write_text("rows")
    assert prepare_outdir(out, dict(old, epochs=9), overwrite=False) is True  # more epochs: resume
    with pytest.raises(RsjaxError, match="other settings .*batch: 64 there, 32 now"):
        prepare_outdir(out, dict(old, batch=32), overwrite=False)
    assert (out / "log.txt").read_text() == "rows"
    assert prepare_outdir(out, dict(old, batch=32), overwrite=True) is False
    assert not (out / "log.txt").exists()


def test_a_run_written_before_an_option_existed_resumes_at_its_default(tmp_path):
    from rsjax.training.trainer import SETTINGS_FILE, prepare_outdir

    out = tmp_path / "run"
    out.mkdir()
    old = {"dataset": "mnist", "batch": 64, "objective": {"lbd": 12.0}}
    (out / SETTINGS_FILE).write_text(json.dumps(old))
    new = {"dataset": "mnist", "batch": 64, "objective": {"lbd": 12.0, "lbd_warmup_epochs": 0}}
    defaults = {"batch": 400, "objective": {"lbd": 12.0, "lbd_warmup_epochs": 0}}
    assert prepare_outdir(out, new, overwrite=False, defaults=defaults) is True
    # an option away from its default is another run; so is a recorded value the defaults do not override
    with pytest.raises(RsjaxError, match="other settings .*objective"):
        prepare_outdir(out, {**new, "objective": {"lbd": 12.0, "lbd_warmup_epochs": 3}}, overwrite=False,
                       defaults=defaults)
    with pytest.raises(RsjaxError, match="other settings .*objective"):
        prepare_outdir(out, new, overwrite=False)  # without the defaults the new key is a difference


# ----------------------------------------------------------------------------- several hosts


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_of_two_devices_equal_one_process_of_four(mnist_dir, tmp_path):
    """`rsjax train --distributed`: two local jax.distributed processes of 2 CPU devices each (gloo
    collectives) train the same weights as one process with 4 devices; process 0 alone writes the model,
    the log and the --certify-every TSV; a second call with more epochs restores the orbax checkpoint in
    both processes and continues (the single run trains its 2 epochs in one call)."""
    common = ["mnist", "lenet", None, "--data-dir", str(mnist_dir), "--batch", "16", "--lr", "0.01",
              "--lr-schedule", "constant", "--seed", "5", "--quiet", "--certify-every", "1",
              "--certify-subset", "0:6:1", "--certify-n0", "10", "--certify-n", "40"]

    def cmd(outdir, epochs, *extra):
        args = list(common)
        args[2] = str(outdir)
        return rsjax_cmd("train", *args, "--epochs", str(epochs), *extra)

    def distributed(epochs):
        port = _free_port()
        env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
        procs = [subprocess.Popen(cmd(tmp_path / "hosts", epochs, "--distributed", "--coordinator",
                                      f"localhost:{port}", "--num-processes", "2", "--process-id", str(k)),
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for k in range(2)]
        logs = [p.communicate(timeout=600) for p in procs]
        for p, (o, e) in zip(procs, logs):
            assert p.returncode == 0, o + e[-3000:]
        return logs

    distributed(1)
    logs = distributed(2)
    assert "resuming" in logs[0][0] + logs[0][1]
    r = subprocess.run(cmd(tmp_path / "one", 2), env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, meta_a = model_variables(tmp_path / "hosts")
    b, _ = model_variables(tmp_path / "one")
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert meta_a["training"]["epochs"] == 2
    log_a = pd.read_csv(tmp_path / "hosts" / "log.txt", delimiter="\t")
    log_b = pd.read_csv(tmp_path / "one" / "log.txt", delimiter="\t")
    assert list(log_a["epoch"]) == [0, 1]
    np.testing.assert_allclose(log_a["train loss"], log_b["train loss"], rtol=1e-4)
    for e in (0, 1):
        ca = pd.read_csv(tmp_path / "hosts" / "certify" / f"epoch_{e:04d}.tsv", delimiter="\t")
        cb = pd.read_csv(tmp_path / "one" / "certify" / f"epoch_{e:04d}.tsv", delimiter="\t")
        assert list(ca["predict"]) == list(cb["predict"])


def test_imagenet_train_split_from_tensorflow_datasets(monkeypatch, tmp_path):
    """ImageNet training images from a prepared tfds ``imagenet2012`` (random-access source, as
    tfds's array_record copies give): RandomResizedCrop(224) + flip per record, deterministic per
    (seed, epoch, row), labels from the records, --subset as record offsets."""
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (40 + 3 * i, 57, 3), dtype=np.uint8) for i in range(6)]

    class Builder:
        data_dir = str(tmp_path / "imagenet2012" / "5.1.0")

        def is_prepared(self):
            return True

        def as_data_source(self, split):
            assert split == "train"
            return [{"image": imgs[i], "label": 10 * i} for i in range(6)]

    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: Builder())
    data = load_train_data("imagenet", "train", tmp_path, "2:6")
    assert len(data) == 4 and list(data.labels) == [20, 30, 40, 50] and "tensorflow-datasets" in data.source
    x, y = data.get([0, 3], epoch=1, seed=7)
    assert x.shape == (2, 224, 224, 3) and list(y) == [20, 50] and 0 <= x.min() and x.max() <= 1
    np.testing.assert_array_equal(x, data.get([0, 3], epoch=1, seed=7)[0])
    assert not np.array_equal(x, data.get([0, 3], epoch=2, seed=7)[0])
    batches = [b for _, b in Pipeline(data, batch=2, seed=7, num_devices=1).iterate(0, 2)]
    assert sorted(np.concatenate([b["idx"] for b in batches]).tolist()) == [2, 3, 4, 5]
