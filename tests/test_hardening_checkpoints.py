"""Checkpoints never run code: pickles that would write a marker file are refused by
``rsjax convert`` and by ``rsjax certify`` on a PyTorch file, unless the user opts in with
``--trust-checkpoint`` (the positive control: then the payload does run)."""

import builtins
import os
import subprocess

import pytest

torch = pytest.importorskip("torch")

from rsjax.cli import main  # noqa: E402


class Marker:
    """A custom class whose construction (on unpickling) writes a file."""

    def __init__(self, path):
        with open(path, "w") as fh:
            fh.write("ran")


class Payload:
    """Pickles as ``func(*args)``: unpickling it calls func."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


PAYLOADS = {
    "os.system": lambda m: Payload(os.system, (f"touch '{m}'",)),
    "subprocess.call": lambda m: Payload(subprocess.call, (["touch", str(m)],)),
    "builtins.exec": lambda m: Payload(builtins.exec, (f"open({str(m)!r}, 'w').close()",)),
    "builtins.eval": lambda m: Payload(builtins.eval, (f"open({str(m)!r}, 'w').close()",)),
    "custom class": lambda m: Payload(Marker, (str(m),)),
}


@pytest.fixture(scope="module")
def lenet_state(shared_data):
    obj = torch.load(shared_data / "models" / "mnist_lenet_noise0.25" / "checkpoint.pth.tar", map_location="cpu",
                     weights_only=True)
    return obj["state_dict"]


def _poisoned(tmp_path, lenet_state, kind):
    """A genuine Cohen-format MNIST LeNet file that also pickles the payload ``kind``."""
    marker = tmp_path / "marker"
    src = tmp_path / "mnist" / "noise_0.25" / "checkpoint.pth.tar"
    src.parent.mkdir(parents=True)
    torch.save({"epoch": 90, "arch": "lenet", "state_dict": lenet_state, "optimizer": PAYLOADS[kind](marker)}, src)
    assert not marker.exists()
    return src, marker


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_convert_refuses_and_never_runs_the_payload(tmp_path, lenet_state, capsys, kind):
    src, marker = _poisoned(tmp_path, lenet_state, kind)
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rsjax convert: error: ") and err.count("\n") == 1
    assert "--trust-checkpoint" in err and "arbitrary code" in err
    assert not marker.exists() and not (tmp_path / "out" / "rsjax_model.json").exists()


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_certify_on_the_fly_refuses_and_never_runs_the_payload(tmp_path, lenet_state, capsys, kind):
    src, marker = _poisoned(tmp_path, lenet_state, kind)
    out = tmp_path / "o.tsv"
    assert main(["certify", "mnist", str(src), "0.25", str(out), "--N0", "10", "--N", "10", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rsjax certify: error: ") and "--trust-checkpoint" in err and err.count("\n") == 1
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_trust_checkpoint_is_the_only_way_in(tmp_path, lenet_state, capsys, kind):
    """Positive control: each payload is live, and runs exactly when the user opts in."""
    src, marker = _poisoned(tmp_path, lenet_state, kind)
    assert main(["convert", str(src), str(tmp_path / "out"), "--trust-checkpoint"]) == 0
    assert marker.exists()
    assert "runs code from the file" in capsys.readouterr().out
