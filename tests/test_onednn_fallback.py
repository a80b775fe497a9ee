"""Without the oneDNN extension (not built, no library, no CPU engine) rsjax says so once and uses
XLA; asking for oneDNN explicitly is a clear error. Runs whether or not the extension built."""

import pytest

from rsjax.errors import RsjaxError
from rsjax.kernels import onednn


@pytest.fixture
def unavailable(monkeypatch):
    monkeypatch.setattr(onednn, "load", lambda: (None, "the extension was not built (test)"))
    monkeypatch.setattr(onednn, "_said", set())


def test_auto_says_once_and_uses_xla(unavailable, capsys):
    assert onednn.resolve("auto", platform="cpu") is False
    assert onednn.resolve("auto", platform="cpu") is False
    err = capsys.readouterr().err
    assert err.count("oneDNN CPU kernels unavailable: the extension was not built (test)") == 1
    assert "using XLA" in err


def test_explicit_onednn_is_an_error(unavailable):
    with pytest.raises(RsjaxError, match="--cpu-kernels onednn: the extension was not built"):
        onednn.resolve("onednn", platform="cpu")


def test_load_classifier_records_xla(unavailable, tmp_path):
    import jax
    import jax.numpy as jnp

    from rsjax.classifier import load_classifier, save_classifier
    from rsjax.models import build_model

    v = build_model("lenet", 10).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    save_classifier(tmp_path / "m", v, {"arch": "lenet", "dataset": "mnist", "num_classes": 10,
                                        "input_shape": [28, 28, 1], "mean": [0.0], "std": [1.0]})
    f, meta = load_classifier(tmp_path / "m", cpu_kernels="auto")
    assert meta["cpu_kernels"] == "xla"
    assert f(jnp.zeros((2, 28, 28, 1))).shape == (2, 10)
