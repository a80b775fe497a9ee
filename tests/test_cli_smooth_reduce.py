"""``rsjax certify --certifier smooth-reduce`` end to end on the real LeNet: the registry wires the
certifier in, its settings go to the sidecar, its rows parse with pandas as Cohen's analyze.py
reads them, the sound radius never exceeds the reference's raw one, bad settings write nothing."""

import json

import pytest

from rsjax.cli import main


@pytest.fixture(scope="module")
def lenet(shared_data, tmp_path_factory):
    from converters.pytorch import convert_checkpoint

    out = tmp_path_factory.mktemp("model") / "lenet"
    convert_checkpoint(shared_data / "models" / "mnist_lenet_noise0.25" / "checkpoint.pth.tar", out, log=lambda s: None)
    return str(out)


def test_smooth_reduce_rows_sidecar_and_radii(lenet, tmp_path):
    import pandas as pd

    out = tmp_path / "sr.tsv"
    rc = main(["certify", "mnist", lenet, "0.25", str(out), "--certifier", "smooth-reduce", "--resize", "30",
               "--patch-size", "28", "--num-patches", "4", "--aggregate", "mean", "--N0", "20", "--N", "200",
               "--batch", "200", "--max", "2", "--no-progress"])
    assert rc == 0
    df = pd.read_csv(out, delimiter="\t")
    assert list(df.columns[:6]) == ["idx", "label", "predict", "radius", "correct", "time"]
    assert {"radius_raw", "op_norm", "c_max", "guarantee", "nonfinite"} <= set(df.columns)
    assert len(df) == 2 and (df["c_max"] == 4).all()
    certified = df["predict"] >= 0
    assert certified.any()
    # the image-space radius is the raw one divided by an operator norm > 1
    assert (df.loc[certified, "radius"] < df.loc[certified, "radius_raw"]).all()
    settings = json.loads((tmp_path / "sr.tsv.json").read_text())
    assert "smooth-reduce" in json.dumps(settings) and '"num_patches": 4' in json.dumps(settings)


def test_smooth_reduce_bad_setting_writes_nothing(lenet, tmp_path, capsys):
    out = tmp_path / "bad.tsv"
    rc = main(["certify", "mnist", lenet, "0.25", str(out), "--certifier", "smooth-reduce", "--resize", "20",
               "--patch-size", "28", "--N", "100", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--patch-size 28 is larger than the resized image" in err[0]
    assert not out.exists()
