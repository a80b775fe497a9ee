"""``--batch auto``: the forward batch per model and device (rsjax.core.batching)."""

import jax
import jax.numpy as jnp
import pytest

from rsjax.cli import main
from rsjax.core.batching import PREFERRED, auto_batch_size, bytes_per_sample, parse_batch
from rsjax.models import build_model


def model_fn(arch, shape):
    module = build_model(arch, 10)
    variables = module.init(jax.random.key(0), jnp.zeros((1,) + shape))
    return lambda x: module.apply(variables, x)


@pytest.mark.parametrize("value,want", [("auto", "auto"), ("AUTO", "auto"), ("400", 400), (" 8 ", 8), (1000, 1000)])
def test_parse_batch(value, want):
    assert parse_batch(value) == want


@pytest.mark.parametrize("value", ["0", "-5", "4.5", "abc", "", 0, -1, 2.0, True])
def test_parse_batch_rejects(value):
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        parse_batch(value)


def test_bytes_per_sample_counts_activations_not_weights():
    """Per input, a 224x224 ResNet-50 needs far more than a CIFAR ResNet-20, which needs more than
    LeNet; the weights (ResNet-50: ~100 MB) are a fixed cost and do not inflate the per-input figure."""
    lenet = bytes_per_sample(model_fn("lenet", (28, 28, 1)), (28, 28, 1))
    r20 = bytes_per_sample(model_fn("cifar_resnet20", (32, 32, 3)), (32, 32, 3))
    assert 0 < lenet < r20
    # at least one 32x32x16 float32 activation map per input, and not the 1.1 MB of weights / 8
    assert 32 * 32 * 16 * 4 <= r20 < 50 * 32 * 32 * 16 * 4


def test_auto_batch_is_the_platform_preference_when_memory_allows():
    f = model_fn("lenet", (28, 28, 1))
    batch, info = auto_batch_size(f, (28, 28, 1), memory_bytes=16 * 2**30)
    assert info["platform"] == "cpu" and batch == PREFERRED["cpu"] == 400


@pytest.mark.parametrize("memory_mib,per_sample,want", [
    (100, 1_000_000, 8),  # 0.25 * 100 MiB / (2 * 1e6 B) = 13.1 -> 8 (multiple of 8)
    (1000, 1_000_000, 128),  # 131.07 -> 128
    (10, 1_000_000, 1),  # 1.31 -> 1: never 0
    (100_000, 1_000_000, 400),  # capped by the platform preference
])
def test_auto_batch_fits_the_memory_budget(memory_mib, per_sample, want):
    batch, info = auto_batch_size(lambda x: x, (4,), memory_bytes=memory_mib * 2**20, per_sample=per_sample)
    assert batch == want and info["batch"] == want


def test_cli_batch_auto_and_bad_batch(shared_data, tmp_path, capsys):
    """``rsjax certify`` with the default ``--batch auto`` says what it chose; a bad ``--batch``
    is a one-line error naming it."""
    from converters.pytorch import convert_checkpoint

    model = tmp_path / "lenet"
    convert_checkpoint(shared_data / "models" / "mnist_lenet_noise0.25" / "checkpoint.pth.tar", model, log=lambda s: None)
    base = ["certify", "mnist", str(model), "0.25", str(tmp_path / "o.tsv"), "--N0", "10", "--N", "50", "--max", "2",
            "--no-progress"]
    assert main(base) == 0
    assert "--batch auto -> 400 (cpu" in capsys.readouterr().err
    assert main(base + ["--batch", "lots", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batch must be a positive integer or 'auto', got 'lots'" in err
