"""Tests for rsjax.analysis and `rsjax analyze` (issue 4).

The acceptance test reads Cohen et al.'s published CIFAR-10 ResNet-110 certify outputs in
../shared/data/cohen_published and checks the numbers of spec section 8 (recomputed from the
same files by the spec authors; they match Cohen's published analysis tables).
"""

import math

import numpy as np
import pytest

from rsjax.analysis import (
    abstain_rate,
    acr,
    best_per_radius,
    certified_accuracy,
    clean_accuracy,
    default_labels,
    envelope,
    high_prob_accuracy,
    high_prob_correction,
    load_many,
    load_results,
    mean_time,
    parse_time,
    render_table,
    summarize,
)
from rsjax.cli import main
from rsjax.cli.analyze import parse_radii
from rsjax.errors import RsjaxError
from rsjax.paths import SHARED_DATA

CIFAR = SHARED_DATA / "cohen_published" / "certify" / "cifar10" / "resnet110"
SIGMAS = ["0.12", "0.25", "0.50", "1.00"]
CIFAR_FILES = [CIFAR / f"noise_{s}" / "test" / f"sigma_{s}" for s in SIGMAS]
PREDICT_N100 = SHARED_DATA / "cohen_published" / "predict" / "imagenet" / "resnet50" / "noise_0.25" / "test" / "N_100"

# spec section 8: CIFAR-10 ResNet-110, train sigma = test sigma, 500 images
SPEC_RADII = [0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
SPEC_ACC = {
    "0.12": [0.814, 0.586, 0, 0, 0, 0, 0, 0],
    "0.25": [0.748, 0.600, 0.428, 0.266, 0, 0, 0, 0],
    "0.50": [0.652, 0.546, 0.414, 0.320, 0.234, 0.152, 0.094, 0],
    "1.00": [0.472, 0.392, 0.340, 0.278, 0.216, 0.174, 0.140, 0.100],
}
SPEC_ACR = {"0.12": 0.270, "0.25": 0.429, "0.50": 0.538, "1.00": 0.542}
SPEC_ABSTAIN = {"0.12": 0.038, "0.25": 0.086, "0.50": 0.166, "1.00": 0.290}
SPEC_SECONDS = {"0.12": 14.1, "0.25": 16.9, "0.50": 17.3, "1.00": 16.2}
# best sigma per radius in the table above (Cohen's * / bold marks)
SPEC_BEST = ["0.12", "0.25", "0.25", "0.50", "0.50", "1.00", "1.00", "1.00"]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cifar():
    return load_many(CIFAR_FILES)


def write(path, text):
    path.write_text(text)
    return path


# ---------------------------------------------------------------- acceptance on published data

def test_cohen_cifar10_table_reproduced(cifar):
    s = summarize(cifar, SPEC_RADII)
    for i, sig in enumerate(SIGMAS):
        assert cifar[i].n == 500 and cifar[i].kind == "cohen"
        np.testing.assert_array_equal(np.round(s.accuracy[i], 3), SPEC_ACC[sig])
        assert round(s.acr[i], 3) == SPEC_ACR[sig]
        assert round(s.abstain[i], 3) == SPEC_ABSTAIN[sig]
        assert round(s.seconds[i], 1) == SPEC_SECONDS[sig]
        assert s.clean[i] == s.accuracy[i][0]
    # best-per-radius marks: exactly one file marked per column, the one the spec names
    assert (s.best.sum(axis=0) == 1).all()
    assert [SIGMAS[j] for j in s.best.argmax(axis=0)] == SPEC_BEST
    np.testing.assert_array_equal(np.round(s.envelope, 3), np.max([SPEC_ACC[k] for k in SIGMAS], axis=0))
    # sigma = 1.00 continues with .048 at r = 2.5 and .020 at r = 3.0
    np.testing.assert_array_equal(np.round(certified_accuracy(cifar[3], [2.5, 3.0]), 3), [0.048, 0.020])


def test_both_time_formats_in_published_files(cifar):
    # noise_0.12 holds timedelta strings, noise_0.25 plain seconds
    first_012 = CIFAR_FILES[0].read_text().splitlines()[1].split("\t")[-1]
    first_025 = CIFAR_FILES[1].read_text().splitlines()[1].split("\t")[-1]
    assert first_012 == "0:00:13.736080" and first_025 == "15.4"
    assert cifar[0].time[0] == pytest.approx(13.736080)
    assert cifar[1].time[0] == pytest.approx(15.4)


def test_cli_markdown_marks_best_sigma(capsys):
    rc = main(["analyze", *map(str, CIFAR_FILES), "--radii", "0:1.5:0.25,2"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["file", "N", "r=0"] and header[-3:] == ["ACR", "abstain", "s/img"]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    assert [r[0] for r in rows] == [f"noise_{s}/test/sigma_{s}" for s in SIGMAS] + ["envelope (max)"]
    for j, r in enumerate(SPEC_RADII):
        col = header.index(f"r={r:g}")
        starred = [SIGMAS[i] for i in range(4) if rows[i][col].endswith("*")]
        assert starred == [SPEC_BEST[j]], (r, starred)
        assert [float(rows[i][col].rstrip("*")) for i in range(4)] == [SPEC_ACC[s][j] for s in SIGMAS]
    assert [rows[i][header.index("ACR")] for i in range(4)] == ["0.270", "0.429", "0.538", "0.542"]
    assert [rows[i][header.index("abstain")] for i in range(4)] == ["3.8%", "8.6%", "16.6%", "29.0%"]


def test_latex_and_csv_marks(cifar):
    s = summarize(cifar, [0.25, 0.5])
    tex = render_table(s, "latex")
    assert tex.startswith(r"\begin{tabular}") and tex.rstrip().endswith(r"\end{tabular}")
    assert r"noise\_0.25/test/sigma\_0.25 & 500 & 0.748 & \textbf{0.600} & \textbf{0.428}" in tex
    assert r"29.0\%" in tex and tex.count(r"\textbf") == 2
    csv_text = render_table(s, "csv").splitlines()
    assert csv_text[0] == "file,N,clean,r=0.25,r=0.5,ACR,abstain,s/img"
    assert csv_text[2].startswith("noise_0.25/test/sigma_0.25,500,0.748,0.600*,0.428*,0.429")
    assert sum(line.count("*") for line in csv_text) == 2


# ---------------------------------------------------------------- metrics

def test_acr_is_integral_of_certified_accuracy(cifar):
    # ACR = mean(correct * R) = integral_0^inf A(r) dr; A is a step function, so a fine
    # Riemann sum must agree to about the step size
    step = 1e-4
    for res in cifar:
        grid = np.arange(0, res.radius.max() + step, step)
        assert np.sum(certified_accuracy(res, grid)) * step == pytest.approx(acr(res), abs=2 * step)


def test_high_prob_formula():
    # by hand: 0.001 + sqrt(0.001 * 0.999 * ln(1000) / 500) + ln(1000) / 1500
    #        = 0.001 + sqrt(1.38017e-5) + 0.0046052 = 0.001 + 0.0037151 + 0.0046052 = 0.0093203
    assert high_prob_correction(0.001, 0.001, 500) == pytest.approx(0.0093203, abs=1e-6)
    # shrinks towards alpha as N grows
    assert high_prob_correction(0.001, 0.001, 10**9) == pytest.approx(0.001, abs=1e-5)
    with pytest.raises(RsjaxError):
        high_prob_correction(1.5, 0.001, 10)
    with pytest.raises(RsjaxError):
        high_prob_correction(0.001, 0.0, 10)


def test_high_prob_accuracy_rows(cifar, capsys):
    res = cifar[2]
    hp = high_prob_accuracy(res, [0, 1.0], 0.001, 0.001)
    np.testing.assert_allclose(hp, np.array([0.652, 0.234]) - 0.0093203, atol=1e-6)
    assert main(["analyze", str(CIFAR_FILES[2]), "--radii", "0,1", "--high-prob", "0.001", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "| noise_0.50/test/sigma_0.50 (high-prob, alpha=0.001, rho=0.001) | 500 | 0.643 | 0.225 |" in out


def test_best_per_radius_ties_and_zero_columns():
    acc = np.array([[0.5, 0.2, 0.0], [0.5, 0.1, 0.0], [0.4, np.nan, 0.0]])
    best = best_per_radius(acc)
    np.testing.assert_array_equal(best, [[True, True, False], [True, False, False], [False, False, False]])
    assert not best_per_radius(acc[:1]).any()  # one file: nothing to compare, nothing marked
    np.testing.assert_array_equal(envelope(acc), [0.5, 0.2, 0.0])


# ---------------------------------------------------------------- reading formats

QCRS_TEXT = (
    "idx\tlabel\tpredict\tradius\tcorrect\tbest_sigma\tpABar\ttime\n"
    "0\t3\t3\t0.7123456789\t1\t0.61\t0.87\t0:00:04.500000\n"
    "5\t1\t-1\t0.0\t0\t0.5\t0.41\t0:00:05.500000\n"
    "10\t2\t7\t0.3\t0\t0.33\t0.73\t0:00:04.000000\n"
    "15\t4\t4\t1.25\t1\t0.9\t0.92\t0:00:06.000000\n"
)


def test_qcrs_file(tmp_path):
    res = load_results(write(tmp_path / "cifar_exp", QCRS_TEXT))
    assert res.kind == "qcrs" and res.n == 4
    np.testing.assert_allclose(res.sigma, [0.61, 0.5, 0.33, 0.9])
    assert res.sigma_varies
    np.testing.assert_allclose(res.extra["pABar"], [0.87, 0.41, 0.73, 0.92])
    np.testing.assert_allclose(certified_accuracy(res, [0, 0.3, 0.7123456789, 0.72, 1.25, 1.3]),
                               [0.5, 0.5, 0.5, 0.25, 0.25, 0.0])
    assert acr(res) == pytest.approx((0.7123456789 + 1.25) / 4)
    assert abstain_rate(res) == 0.25 and clean_accuracy(res) == 0.5
    assert mean_time(res) == pytest.approx(5.0)


def test_rsjax_file_with_settings_and_extra_columns(tmp_path):
    text = (
        "# rsjax certify 0.1.0\n# sigma=0.25\n# n0=100\n# alpha=0.001\n"
        "idx\tlabel\tpredict\tradius\tcorrect\ttime\tsigma\tpA_lower\tguarantee\tdtype\tmethod\n"
        "0\t3\t3\t0.5\t1\t2.5\t0.25\t0.977\tsound\tfloat32\tcohen\n"
        "1\t8\t8\t0.1\t1\t1.5\t0.25\t0.66\tsound\tfloat32\tcohen\n"
        "2\t8\t-1\t0\t0\t0:00:02\t0.25\t0.4\tsound\tfloat32\tcohen\n"
    )
    res = load_results(write(tmp_path / "out.tsv", text))
    assert res.kind == "rsjax"
    assert res.settings == {"sigma": "0.25", "n0": "100", "alpha": "0.001"}
    assert not res.sigma_varies and res.sigma[0] == 0.25
    assert res.extra["method"] == ["cohen"] * 3
    np.testing.assert_allclose(res.extra["pA_lower"], [0.977, 0.66, 0.4])
    assert mean_time(res) == pytest.approx(2.0)
    assert acr(res) == pytest.approx(0.2)
    assert res.label == "/".join((tmp_path / "out").parts[-3:])  # suffix .tsv dropped


def test_rsjax_file_header_first_with_sidecar(tmp_path):
    import json

    text = ("idx\tlabel\tpredict\tradius\tcorrect\ttime\tsigma\tpA_lower\tguarantee\tdtype\tnonfinite\n"
            "0\t3\t3\t0.5\t1\t2.5\t0.25\t0.977\tfixed\tfloat32\t0\n")
    path = write(tmp_path / "out.tsv", text)
    (tmp_path / "out.tsv.json").write_text(json.dumps({"format": "rsjax-results/2", "columns": text.split("\n")[0].split("\t"),
                                                       "settings": {"sigma": 0.25, "N": 100},
                                                       "info": {"checkpoint": "m"}}))
    res = load_results(path)
    assert res.kind == "rsjax" and res.settings == {"checkpoint": "m", "sigma": 0.25, "N": 100}
    assert res.extra["nonfinite"].tolist() == [0.0]
    pred = write(tmp_path / "p.tsv", "idx\tlabel\tpredict\tcorrect\ttime\tnonfinite\n0\t3\t3\t1\t0.5\t0\n")
    assert load_results(pred).kind == "predict"  # rsjax predict's columns after Cohen's


def test_predict_file_accuracy_only(capsys):
    res = load_results(PREDICT_N100)
    assert res.kind == "predict" and res.radius is None and res.n == 500
    rows = [ln.split("\t") for ln in PREDICT_N100.read_text().splitlines()[1:]]
    expected = np.mean([int(r[3]) for r in rows])
    assert clean_accuracy(res) == expected
    acc = certified_accuracy(res, [0, 0.5])
    assert acc[0] == expected and math.isnan(acc[1]) and math.isnan(acr(res))
    assert main(["analyze", str(PREDICT_N100), "--radii", "0,0.5"]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    assert f"| {expected:.3f} | - | - |" in row  # one file: no best mark


def test_parse_time():
    assert parse_time("0:00:13.736080") == pytest.approx(13.73608)
    assert parse_time("0:02:31.238689") == pytest.approx(151.238689)
    assert parse_time("15.4") == 15.4
    assert parse_time("3") == 3.0
    assert parse_time("1 day, 0:00:01.5") == pytest.approx(86401.5)
    assert parse_time("2 days, 1:00:00") == pytest.approx(2 * 86400 + 3600)
    for bad in ("abc", "-1.0", "nan", "0:0:1", ""):
        with pytest.raises(ValueError):
            parse_time(bad)


GOOD_HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"


@pytest.mark.parametrize("text, message", [
    ("", "empty file"),
    ("# only a comment\n", "empty file"),
    (GOOD_HEADER, "no data rows"),
    ("idx,label,predict,radius,correct,time\n0,1,1,0.5,1,1.0\n", "tab-separated"),
    ("idx\tlabel\tprediction\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t1\n", "not a certification or prediction output"),
    (GOOD_HEADER + "0\t1\t1\t0.5\t1\n", "line 2 has 5 tab-separated cells"),
    (GOOD_HEADER + "0\t1\t1\t0.5\t1\t1.0\nx\t1\t1\t0.5\t1\t1.0\n", "line 3: idx 'x' is not an integer"),
    (GOOD_HEADER + "0\t1\t1\tbig\t1\t1.0\n", "radius 'big' is not a number"),
    (GOOD_HEADER + "0\t1\t1\t-0.5\t1\t1.0\n", "radius must be a finite number >= 0"),
    (GOOD_HEADER + "0\t1\t2\t0.5\t1\t1.0\n", "correct disagrees with predict == label"),
    (GOOD_HEADER + "0\t1\t1\t0.5\t2\t1.0\n", "correct must be 0 or 1"),
    (GOOD_HEADER + "0\t1\t1\t0.5\t1\tyesterday\n", "time 'yesterday' is neither"),
    (GOOD_HEADER + "0\t1\t1\t0.5\t1\t1.0\n0\t1\t1\t0.5\t1\t1.0\n", "idx 0 appears 2 times"),
    (GOOD_HEADER + "0\t1\t1\t0.5\t1\t1.0\n" + GOOD_HEADER, "line 3 repeats the header"),
])
def test_bad_files(tmp_path, text, message):
    path = write(tmp_path / "bad.tsv", text)
    with pytest.raises(RsjaxError) as e:
        load_results(path)
    msg = str(e.value)
    assert message in msg and str(path) in msg and "\n" not in msg


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(RsjaxError, match="no such file"):
        load_results(tmp_path / "nope")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(RsjaxError, match="not a text file"):
        load_results(tmp_path / "bin")


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = write(tmp_path / "bad.tsv", "hello\tworld\n1\t2\n")
    assert main(["analyze", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rsjax analyze: error: ") and str(bad) in err and "\n" not in err
    assert main(["analyze", str(CIFAR_FILES[0]), "--labels", "a", "b"]) == 2
    assert "2 labels given for 1 files" in capsys.readouterr().err
    assert main(["analyze", str(CIFAR_FILES[0]), "--radii", "0,x"]) == 2
    assert "--radii" in capsys.readouterr().err
    assert main(["analyze", str(CIFAR_FILES[0]), "--plot", str(tmp_path / "missing_dir" / "p.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_parse_radii():
    np.testing.assert_array_equal(parse_radii("0.5,0,0.25,0.5"), [0, 0.25, 0.5])
    grid = parse_radii("0:1:0.25")
    np.testing.assert_array_equal(grid, [0, 0.25, 0.5, 0.75, 1.0])
    g = parse_radii("0:0.5:0.1")
    assert g[3] == 0.3  # exact decimal, so "radius >= 0.3" holds for a file's 0.3
    np.testing.assert_array_equal(parse_radii("0.25:1.5:0.25,2"), [0.25, 0.5, 0.75, 1, 1.25, 1.5, 2])
    for bad in ("", "a", "-0.5", "0:1:0", "1:2"):
        with pytest.raises(RsjaxError):
            parse_radii(bad)


def test_default_labels():
    assert default_labels(CIFAR_FILES)[1] == "noise_0.25/test/sigma_0.25"
    assert default_labels(["a/x/run1/out.tsv", "b/x/run1/out.tsv"]) == ["a/x/run1/out", "b/x/run1/out"]
    assert default_labels(["r.tsv"]) == ["r"]


# ---------------------------------------------------------------- plots and outputs

def test_plot_and_outputs(tmp_path, capsys):
    qcrs = write(tmp_path / "qcrs_exp", QCRS_TEXT)
    out = tmp_path / "curves.png"
    table = tmp_path / "table.tex"
    rc = main(["analyze", str(CIFAR_FILES[0]), str(CIFAR_FILES[3]), str(qcrs), "--labels", "s012", "s100", "qcrs",
               "--format", "latex", "--out", str(table), "--plot", str(out), "--max-radius", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert table.read_text() == printed and r"\begin{tabular}" in printed and "s012 &" in printed
    for png in (out, tmp_path / "curves_sigma.png"):
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
        pdf = png.with_suffix(".pdf").read_bytes()
        assert pdf[:5] == b"%PDF-" and len(pdf) > 1000


def test_no_sigma_plot_without_per_image_sigma(tmp_path):
    out = tmp_path / "c.png"
    assert main(["analyze", str(CIFAR_FILES[1]), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "c_sigma.png").exists()
