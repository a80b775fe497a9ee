"""``rsjax certify`` / ``predict`` / ``merge`` under misuse and faults: result files that pandas
reads as Cohen's analyze.py does, the earlier layout resumed and migrated, the model identified
by content, one writer per file, every argument checked before the output exists, OS faults as
one line with the rows kept, Ctrl-C at any moment."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas
import pytest

from rsjax.cli import main
from rsjax.core import io
from rsjax.core.io import OutputLock, settings_lines
from rsjax.paths import REPO_ROOT

FAST = ["--N0", "10", "--N", "50", "--batch", "100", "--no-progress"]
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def lenet(shared_data, tmp_path_factory):
    from converters.pytorch import convert_checkpoint

    out = tmp_path_factory.mktemp("model") / "lenet"
    convert_checkpoint(shared_data / "models" / "mnist_lenet_noise0.25" / "checkpoint.pth.tar", out, log=lambda s: None)
    return out


def certify(lenet, out, *extra, cmd="certify"):
    flags = FAST if cmd == "certify" else FAST[2:]
    return main([cmd, "mnist", str(lenet), "0.25", str(out), *flags, *extra])


def cohen_analyze(path):
    """Cohen's analyze.py (locuslab/smoothing, code/analyze.py ApproximateAccuracy): read with
    pandas exactly so, certified accuracy at r = (correct & radius >= r).mean()."""
    df = pandas.read_csv(path, delimiter="\t")
    return df, [float((df["correct"] & (df["radius"] >= r)).mean()) for r in (0.0, 0.25, 0.5)]


def rows(path, drop=("time",)):
    lines = Path(path).read_text().splitlines()
    header = lines[0].split("\t")
    keep = [j for j, c in enumerate(header) if c not in drop]
    return [[line.split("\t")[j] for j in keep] for line in lines[1:]]


# ------------------------------------------------------------------------ pandas-readable files

def test_certify_and_predict_outputs_read_by_pandas(lenet, tmp_path):
    out, pred = tmp_path / "c.tsv", tmp_path / "p.tsv"
    assert certify(lenet, out, "--max", "3") == 0
    df, acc = cohen_analyze(out)
    assert list(df.columns[:6]) == ["idx", "label", "predict", "radius", "correct", "time"]
    assert list(df["idx"]) == [0, 1, 2] and df["radius"].dtype == np.float64 and acc[0] == 1.0
    assert (df["nonfinite"] == 0).all()
    side = json.loads((tmp_path / "c.tsv.json").read_text())
    assert side["columns"] == list(df.columns) and side["settings"]["sigma"] == 0.25
    assert side["settings"]["method"] == {"name": "cohen"} and side["settings"]["certifier"] == {"name": "cohen"}
    assert certify(lenet, pred, "--max", "3", cmd="predict") == 0
    df = pandas.read_csv(pred, delimiter="\t")
    assert list(df.columns) == ["idx", "label", "predict", "correct", "time", "nonfinite"] and len(df) == 3


def test_each_method_output_read_by_pandas(lenet, tmp_path):
    from rsjax.methods import all_methods

    small = {"ddrs": ["--ddrs-steps", "2"], "qcrs": ["--gradient_n", "20"], "instars": ["--instars-n", "20"]}
    for name, m in sorted(all_methods().items()):
        out = tmp_path / f"{name}.tsv"
        assert certify(lenet, out, "--max", "1", "--method", name, *small.get(name, [])) == 0, name
        df, _ = cohen_analyze(out)
        assert list(df.columns) == [*io.CERTIFY_COLUMNS, "sigma", "pA_lower", "guarantee", "dtype", "nonfinite",
                                    *m.extra_columns] and len(df) == 1, name
        assert json.loads((tmp_path / f"{name}.tsv.json").read_text())["settings"]["method"]["name"] == name


def test_distributed_part_and_merge_read_by_pandas(lenet, tmp_path):
    out = tmp_path / "d.tsv"
    assert certify(lenet, out, "--max", "2", "--distributed", "--num-processes", "1") == 0
    part = tmp_path / "d.tsv.part0of1"
    df, _ = cohen_analyze(part)
    assert list(df["idx"]) == [0, 1] and not out.exists()
    assert json.loads((tmp_path / "d.tsv.part0of1.json").read_text())["info"]["part"] == "0of1"
    merged = tmp_path / "m.tsv"
    assert main(["merge", str(part), "-o", str(merged)]) == 0
    df, _ = cohen_analyze(merged)
    assert list(df["idx"]) == [0, 1]
    assert json.loads((tmp_path / "m.tsv.json").read_text())["settings"]["sigma"] == 0.25


def test_merge_compares_results_not_time(tmp_path, capsys):
    header = "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    (tmp_path / "a.tsv").write_text(f"{header}\n0\t3\t3\t0.5\t1\t1.25\n")
    (tmp_path / "b.tsv").write_text(f"{header}\n0\t3\t3\t0.5\t1\t9.75\n1\t2\t2\t0.1\t1\t1.0\n")
    assert main(["merge", str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv"), "-o", str(tmp_path / "m.tsv")]) == 0
    assert rows(tmp_path / "m.tsv", drop=()) == [["0", "3", "3", "0.5", "1", "1.25"], ["1", "2", "2", "0.1", "1", "1.0"]]
    (tmp_path / "c.tsv").write_text(f"{header}\n0\t3\t3\t0.6\t1\t1.25\n")
    assert main(["merge", str(tmp_path / "a.tsv"), str(tmp_path / "c.tsv"), "-o", str(tmp_path / "n.tsv")]) == 2
    assert "different results (radius)" in capsys.readouterr().err


# ------------------------------------------------------------------------ the earlier layout

def _to_legacy(path, settings):
    """Rewrite an rsjax output in the earlier layout: '# key=value' lines, no nonfinite column, no sidecar."""
    lines = Path(path).read_text().splitlines()
    j = lines[0].split("\t").index("nonfinite")
    body = ["\t".join(c for k, c in enumerate(line.split("\t")) if k != j) for line in lines]
    Path(path).write_text("\n".join(settings_lines(settings) + body) + "\n")
    os.unlink(str(path) + ".json")


def test_earlier_layout_is_resumed_and_migrated(lenet, tmp_path, capsys):
    full, old = tmp_path / "full.tsv", tmp_path / "old.tsv"
    assert certify(lenet, full, "--max", "4") == 0
    assert certify(lenet, old, "--max", "2") == 0
    legacy = {"rsjax": "certify", "dataset": "mnist", "split": "test", "checkpoint": str(lenet), "arch": "lenet",
              "sigma": 0.25, "N0": 10, "N": 50, "alpha": 0.001, "skip": 1, "seed": 0, "dtype": "float32",
              "method": "cohen"}
    _to_legacy(old, {**legacy, "sigma": 0.5})
    capsys.readouterr()
    assert certify(lenet, old, "--max", "4") == 2  # another sigma: refused, file untouched
    assert "sigma: the file has '0.5', this run '0.25'" in capsys.readouterr().err
    assert Path(old).read_text().startswith("# rsjax=certify")
    _to_legacy_again = Path(old).read_text().replace("# sigma=0.5", "# sigma=0.25")
    Path(old).write_text(_to_legacy_again)
    assert certify(lenet, old, "--max", "4") == 0
    assert "settings moved to old.tsv.json" in capsys.readouterr().err
    df = pandas.read_csv(old, delimiter="\t")  # migrated: header first
    assert list(df["idx"]) == [0, 1, 2, 3] and df["nonfinite"].isna().tolist() == [True, True, False, False]
    assert [r[:-1] for r in rows(old)] == [r[:-1] for r in rows(full)]  # every column but time and nonfinite
    assert json.loads(Path(str(old) + ".json").read_text())["settings"]["sigma"] == 0.25


# ------------------------------------------------------------------------ model identity

def test_resume_identifies_the_model_by_content(lenet, tmp_path, shared_data, capsys):
    import shutil

    import torch

    from converters.pytorch import convert_checkpoint

    model = tmp_path / "models" / "lenet"
    shutil.copytree(lenet, model)
    out = tmp_path / "o.tsv"
    assert certify(lenet, out, "--max", "1") == 0
    # another spelling of a model with the same content resumes the file
    assert certify(tmp_path / "models" / ".." / "models" / "lenet", out, "--max", "2") == 0
    assert len(rows(out)) == 2
    # another model converted into the same directory: refused, nothing appended
    obj = torch.load(shared_data / "models" / "mnist_lenet_noise0.25" / "checkpoint.pth.tar", map_location="cpu",
                     weights_only=True)
    obj["state_dict"] = {k: v * 1.01 if k.endswith("fc2.weight") else v for k, v in obj["state_dict"].items()}
    src = tmp_path / "mnist_lenet_other.pth"
    torch.save(obj, src)
    convert_checkpoint(src, model, overwrite=True, log=lambda s: None)
    capsys.readouterr()
    assert certify(model, out, "--max", "3") == 2
    err = capsys.readouterr().err
    assert "model_sha256" in err and "--overwrite" in err and err.count("\n") == 1
    assert len(rows(out)) == 2


# ------------------------------------------------------------------------ one writer per file

def _wait_for(pred, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_second_process_stops_at_once_naming_the_holder(lenet, tmp_path):
    out = tmp_path / "o.tsv"
    cmd = [sys.executable, "-m", "rsjax", "certify", "mnist", str(lenet), "0.25", str(out), "--N0", "100",
           "--N", "100000", "--batch", "1000", "--no-progress"]
    first = subprocess.Popen(cmd, env=ENV, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(lambda: out.exists() and out.read_text().startswith("idx") or first.poll() is not None)
        assert first.poll() is None, first.stderr.read()
        t0 = time.time()
        second = subprocess.run(cmd, env=ENV, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        err = second.stderr
        assert err.count("\n") == 1 and str(out) in err and f"pid {first.pid}" in err, err
        assert first.poll() is None  # the first one goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert time.time() - t0 < 60
    assert out.read_text().splitlines()[0].startswith("idx\tlabel")  # the second wrote nothing


def test_merge_output_and_distributed_parts_are_locked(lenet, tmp_path, capsys):
    header = "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    (tmp_path / "a.tsv").write_text(f"{header}\n0\t3\t3\t0.5\t1\t1.25\n")
    merged = tmp_path / "m.tsv"
    with OutputLock(merged):
        assert main(["merge", str(tmp_path / "a.tsv"), "-o", str(merged)]) == 2
    err = capsys.readouterr().err
    assert f"pid {os.getpid()}" in err and str(merged) in err and not merged.exists()
    out = tmp_path / "d.tsv"
    with OutputLock(str(out) + ".part0of1"):
        assert certify(lenet, out, "--max", "1", "--distributed", "--num-processes", "1") == 2
    assert f"pid {os.getpid()}" in capsys.readouterr().err
    assert certify(lenet, out, "--max", "1", "--distributed", "--num-processes", "1") == 0  # released


# ------------------------------------------------------------------------ checked before any output

@pytest.mark.parametrize("change,msg", [
    ({3: "inf"}, "sigma must be a finite number > 0"),
    ({3: "nan"}, "sigma must be a finite number > 0"),
    ({"--seed": str(2**40)}, "--seed must be in 0..4294967295"),
    ({"--seed": "-1"}, "--seed must be in"),
    ({"--dtype": "float16"}, "--dtype must be one of"),
    ({"--method": "qcrs", "--epsilon": "-1"}, "epsilon"),
    ({"--method": "qcrs", "--left": "2", "--right": "0.1"}, "left"),
    ({"--method": "ddrs", "--left": "0.1"}, "--left belongs to --method qcrs, not --method ddrs"),
    ({"--skip": "0"}, "--skip must be an integer >= 1"),
    ({"--batch": "0"}, "batch"),
    ({"--split": "val"}, "unknown split"),
])
def test_every_argument_is_checked_before_the_output_exists(lenet, tmp_path, capsys, change, msg):
    out = tmp_path / "x.tsv"
    argv = ["certify", "mnist", str(lenet), "0.25", str(out), "--N0", "10", "--N", "10", "--no-progress"]
    for k, v in change.items():
        if isinstance(k, int):
            argv[k] = v
        else:
            argv += [k, v]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rsjax certify: error: ") and err.count("\n") == 1 and msg in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ operating-system faults

def test_disk_full_is_one_line_and_the_rows_resume(lenet, tmp_path, capsys, monkeypatch):
    out, full = tmp_path / "o.tsv", tmp_path / "full.tsv"
    assert certify(lenet, full, "--max", "4") == 0
    real_write, calls = os.write, {"n": 0}

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}") == str(out) and bytes(data[:1]).isdigit():  # a result row
            calls["n"] += 1
            if calls["n"] == 3:  # the disk fills in the middle of the third row
                real_write(fd, bytes(data[:5]))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(io.os, "write", write)
    capsys.readouterr()
    assert certify(lenet, out, "--max", "4", "--batch", "20") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err and "No space left on device" in err and "Traceback" not in err
    monkeypatch.setattr(io.os, "write", real_write)
    text = out.read_text()
    assert text.count("\n") == 3 and not text.endswith("\n")  # header, two complete rows, a partial one
    assert certify(lenet, out, "--max", "4") == 0
    assert rows(out) == rows(full)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_unwritable_directory_is_one_line(lenet, tmp_path, capsys, monkeypatch, code):
    out = tmp_path / "o.tsv"
    real_open = os.open

    def fake_open(path, flags, *a):
        if Path(path).parent == tmp_path and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(io.os, "open", fake_open)
    assert certify(lenet, out, "--max", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("rsjax certify: error: ") and err.count("\n") == 1 and os.strerror(code) in err
    assert str(tmp_path) in err and not out.exists()


def test_unwritable_compilation_cache_is_a_warning(lenet, tmp_path):
    ro = tmp_path / "file-not-dir"
    ro.write_text("x")  # a cache directory below a file cannot be created, even by root
    env = {**ENV, "JAX_COMPILATION_CACHE_DIR": str(ro / "cache")}
    env.pop("RSJAX_XLA", None)
    res = subprocess.run([sys.executable, "-m", "rsjax", "certify", "mnist", str(lenet), "0.25", str(tmp_path / "o.tsv"),
                          *FAST, "--max", "1"], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "warning: compilation cache disabled" in res.stderr and "Traceback" not in res.stderr
    assert len(rows(tmp_path / "o.tsv")) == 1


# ------------------------------------------------------------------------ Ctrl-C

@pytest.mark.parametrize("after", [0.3, 1.5, "rows"])
def test_ctrl_c_at_any_moment_exits_130_with_one_line(lenet, tmp_path, after):
    out = tmp_path / "o.tsv"
    proc = subprocess.Popen([sys.executable, "-m", "rsjax", "certify", "mnist", str(lenet), "0.25", str(out),
                             "--N0", "100", "--N", "2000", "--batch", "1000", "--no-progress"],
                            env=ENV, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if after == "rows":
        assert _wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 2 or proc.poll() is not None)
    else:
        time.sleep(after)  # during start-up: imports (jax), parsing, loading
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("rsjax certify: interrupted")
    assert len([line for line in err.splitlines() if "interrupted" in line]) == 1
    if after == "rows":
        assert main(["certify", "mnist", str(lenet), "0.25", str(out), "--N0", "100", "--N", "2000", "--batch", "1000",
                     "--no-progress", "--max", "3"]) == 0  # resumes


def test_interrupt_swallowed_by_a_library_still_exits_130(lenet, tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt caught inside the run (as a JAX host callback may do) must not end in 0."""
    import rsjax.cli.certify as cc

    real = cc.group_loop

    def swallowing(*a, **kw):
        for k, group in enumerate(real(*a, **kw)):
            if k == 0:
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.1)
                except KeyboardInterrupt:
                    pass  # swallowed
            yield group

    monkeypatch.setattr(cc, "group_loop", swallowing)
    assert certify(lenet, tmp_path / "o.tsv", "--max", "3", "--batch", "20") == 130
    assert "interrupted" in capsys.readouterr().err
