"""``rsjax certify`` / ``rsjax predict`` end to end: output format, resume after SIGKILL, bad input,
the progress bar, the certifier registry."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from rsjax.cli import main
from rsjax.core.io import ResultWriter
from rsjax.errors import RsjaxError
from rsjax.paths import REPO_ROOT


@pytest.fixture(scope="module")
def lenet(shared_data, tmp_path_factory):
    """The real MNIST LeNet (sigma 0.25) converted once into a model directory."""
    from converters.pytorch import convert_checkpoint

    out = tmp_path_factory.mktemp("model") / "lenet"
    convert_checkpoint(shared_data / "models" / "mnist_lenet_noise0.25" / "checkpoint.pth.tar", out, log=lambda s: None)
    return str(out)


def rows_without_time(path):
    lines = open(path).read().splitlines()
    header = lines[0].split("\t")
    t = header.index("time")
    return lines[:1], [tuple(c for j, c in enumerate(l.split("\t")) if j != t) for l in lines[1:]]


def test_resume_after_sigkill_equals_uninterrupted_run(lenet, tmp_path):
    args = ["mnist", lenet, "0.25", None, "--N0", "100", "--N", "500", "--batch", "500", "--skip", "250", "--no-progress"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def cmd(out):
        a = list(args)
        a[3] = str(out)
        return [sys.executable, "-m", "rsjax", "certify"] + a

    full, part = tmp_path / "full.tsv", tmp_path / "part.tsv"
    subprocess.run(cmd(full), check=True, env=env, cwd=REPO_ROOT, capture_output=True)
    proc = subprocess.Popen(cmd(part), env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if part.exists() and part.read_text().count("\n") >= 1 + 2:  # header + >= 2 rows
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, killed_rows = rows_without_time(part)
    head_full, rows_full = rows_without_time(full)
    assert 2 <= len(killed_rows) < len(rows_full) == 40
    res = subprocess.run(cmd(part), check=True, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert "resuming" in res.stderr and "certified accuracy r=0.5" in res.stdout
    head_part, rows_part = rows_without_time(part)
    assert head_part == head_full and rows_part == rows_full
    assert json.loads((tmp_path / "part.tsv.json").read_text())["settings"] == \
        json.loads((tmp_path / "full.tsv.json").read_text())["settings"]
    assert [r[0] for r in rows_full] == [str(i) for i in range(0, 10000, 250)]


def test_output_columns_mismatch_and_overwrite(lenet, tmp_path, capsys):
    out = tmp_path / "o.tsv"
    base = ["certify", "mnist", lenet, "0.25", str(out), "--N0", "10", "--N", "50", "--max", "2", "--no-progress"]
    assert main(base) == 0
    lines = out.read_text().splitlines()
    side = json.loads((tmp_path / "o.tsv.json").read_text())
    assert side["settings"]["sigma"] == 0.25 and side["settings"]["method"] == {"name": "cohen"}
    header = lines[0].split("\t")
    assert header[:6] == ["idx", "label", "predict", "radius", "correct", "time"]
    assert header[6:] == ["sigma", "pA_lower", "guarantee", "dtype", "nonfinite"] == side["columns"][6:]
    row = lines[-1].split("\t")
    assert row[0] == "1" and row[8] == "fixed" and float(row[6]) == 0.25 and float(row[5]) > 0 and row[10] == "0"
    assert repr(float(row[3])) == row[3]  # full precision
    capsys.readouterr()
    assert main(base[:3] + ["0.5"] + base[4:]) == 2  # another sigma into the same file
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different settings (sigma: the file has 0.25, this run 0.5)" in err
    assert "--overwrite" in err
    assert main(base[:3] + ["0.5"] + base[4:] + ["--overwrite"]) == 0
    assert json.loads((tmp_path / "o.tsv.json").read_text())["settings"]["sigma"] == 0.5
    # a longer --max continues the same file
    assert main(base[:-2] + ["3", "--no-progress"]) == 2  # settings now say sigma 0.5
    assert main(base[:3] + ["0.5"] + base[4:-2] + ["3", "--no-progress"]) == 0
    assert [l.split("\t")[0] for l in out.read_text().splitlines()[1:]] == ["0", "1", "2"]


def test_predict_output(lenet, tmp_path):
    out = tmp_path / "p.tsv"
    assert main(["predict", "mnist", lenet, "0.25", str(out), "--N", "100", "--max", "3", "--no-progress"]) == 0
    lines = out.read_text().splitlines()
    assert lines[0].split("\t") == ["idx", "label", "predict", "correct", "time", "nonfinite"]
    assert [l.split("\t")[:3] for l in lines[1:]] == [["0", "7", "7"], ["1", "2", "2"], ["2", "1", "1"]]


def test_writer_drops_partial_last_line(tmp_path):
    p = tmp_path / "w.tsv"
    w = ResultWriter(p, ["idx", "label", "time"], {"a": 1})
    w.write([0, 3, 0.5])
    w.write([4, 1, 0.25])
    w.close()
    with open(p, "a") as fh:
        fh.write("8\t2")  # a row cut by a kill
    w = ResultWriter(p, ["idx", "label", "time"], {"a": 1})
    assert w.resumed and w.last_idx == 4 and len(w.rows) == 2
    w.write([8, 2, 1.0])
    w.close()
    assert p.read_text() == "idx\tlabel\ttime\n0\t3\t0.5\n4\t1\t0.25\n8\t2\t1.0\n"
    assert json.loads((tmp_path / "w.tsv.json").read_text())["settings"] == {"a": 1}
    assert not (tmp_path / "w.tsv.lock").exists()  # released on close
    with pytest.raises(RsjaxError, match="different settings \\(a: the file has 1, this run 2\\).*--overwrite"):
        ResultWriter(p, ["idx", "label", "time"], {"a": 2})
    with pytest.raises(RsjaxError, match="other columns"):
        ResultWriter(p, ["idx", "label", "radius", "time"], {"a": 1})
    (tmp_path / "w.tsv.json").unlink()
    with pytest.raises(RsjaxError, match="without its settings file w.tsv.json"):
        ResultWriter(p, ["idx", "label", "time"], {"a": 1})


def test_writer_holds_a_lock_until_closed(tmp_path):
    from rsjax.core.io import OutputBusyError

    p = tmp_path / "w.tsv"
    w = ResultWriter(p, ["idx", "time"], {})
    with pytest.raises(OutputBusyError, match=f"pid {os.getpid()}"):
        ResultWriter(p, ["idx", "time"], {})
    w.close()
    ResultWriter(p, ["idx", "time"], {}).close()


def test_progress_bar_moves_per_device_step(lenet, tmp_path, capsys, monkeypatch):
    """One group of 4 images, N = 2000 draws at batch 100: the bar must move within the group."""
    import rsjax.cli.certify as cc

    monkeypatch.setattr(cc, "BAR_MININTERVAL", 0)
    seen = []
    real = cc.Progress.samples
    monkeypatch.setattr(cc.Progress, "samples", lambda self, k: (seen.append(self.bar.n), real(self, k)))
    assert main(["certify", "mnist", lenet, "0.25", str(tmp_path / "o.tsv"), "--N0", "100", "--N", "2000",
                 "--batch", "100", "--max", "4"]) == 0
    err = capsys.readouterr().err
    assert len(seen) >= 10 and len(set(seen)) >= 10  # many distinct positions inside the group
    assert "certified acc=" in err and "ACR=" in err and "<" in err  # accuracy so far and an ETA


def test_certifier_is_chosen_and_recorded(lenet, tmp_path, capsys):
    from rsjax.certifiers import all_certifiers, get_certifier

    assert "cohen" in all_certifiers() and get_certifier("cohen").guarantee == "fixed"
    out = tmp_path / "o.tsv"
    assert main(["certify", "mnist", lenet, "0.25", str(out), "--N0", "10", "--N", "50", "--max", "1",
                 "--certifier", "cohen", "--no-progress"]) == 0
    assert json.loads((tmp_path / "o.tsv.json").read_text())["settings"]["certifier"] == {"name": "cohen"}
    with pytest.raises(SystemExit):
        main(["certify", "mnist", lenet, "0.25", str(out), "--certifier", "nope"])
    with pytest.raises(RsjaxError, match="unknown certifier 'nope'"):
        get_certifier("nope")


@pytest.mark.parametrize("change,msg", [
    ({3: "0"}, "sigma must be a finite number > 0"),
    ({3: "-0.5"}, "sigma must be a finite number > 0"),
    ({"--alpha": "0"}, "alpha must be in (0, 1)"),
    ({"--alpha": "1.5"}, "alpha must be in (0, 1)"),
    ({"--N0": "0"}, "N0 must be an integer >= 1"),
    ({"--N": "0"}, "N must be an integer >= 1"),
    ({1: "svhn"}, "unknown dataset 'svhn'"),
    ({"--data-dir": "EMPTY"}, "no mnist test data found"),
    ({1: "cifar10"}, "cifar10 images have shape (32, 32, 3)"),
    ({2: "NOMODEL"}, "no such model directory or checkpoint file"),
])
def test_bad_input_one_line(lenet, tmp_path, capsys, change, msg):
    argv = ["certify", "mnist", lenet, "0.25", str(tmp_path / "x.tsv"), "--N0", "10", "--N", "10", "--alpha", "0.01"]
    for k, v in change.items():
        v = {"EMPTY": str(tmp_path), "NOMODEL": str(tmp_path / "nomodel")}.get(v, v)
        if isinstance(k, int):
            argv[k] = v
        elif k in argv:
            argv[argv.index(k) + 1] = v
        else:
            argv += [k, v]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rsjax certify: error: ") and err.count("\n") == 1 and msg in err


def test_start_index_selects_the_rows_of_the_full_loop(lenet, tmp_path, capsys):
    """--start S: indices S, S+skip, ... with the rows (noise from (seed, index)) of the loop from 0."""
    full, part = tmp_path / "full.tsv", tmp_path / "start.tsv"
    common = ["mnist", lenet, "0.25"]
    opts = ["--N0", "10", "--N", "50", "--skip", "1000", "--no-progress"]
    assert main(["certify", *common, str(full), *opts]) == 0
    assert main(["certify", *common, str(part), *opts, "--start", "8000"]) == 0
    a = pd.read_csv(full, delimiter="\t").drop(columns=["time"])
    b = pd.read_csv(part, delimiter="\t").drop(columns=["time"])
    assert list(b["idx"]) == [8000, 9000]
    pd.testing.assert_frame_equal(b.reset_index(drop=True), a[a["idx"] >= 8000].reset_index(drop=True))
    capsys.readouterr()
    assert main(["certify", *common, str(tmp_path / "bad.tsv"), *opts, "--start", "10000"]) == 2
    assert "--start 10000: the test split holds 10000 images" in capsys.readouterr().err
    assert not (tmp_path / "bad.tsv").exists()
