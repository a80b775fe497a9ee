"""`rsjax merge`: per-host parts -> one Cohen TSV sorted by idx, settings in its sidecar.

The parts here are in rsjax's earlier layout (``# key=value`` lines before the header) or
plain Cohen files; parts with sidecars are merged in tests/test_hardening_cli.py."""

import json

import pytest

from rsjax.cli import main

SETTINGS = ["# rsjax=certify", "# sigma=0.25", "# N=100000", "# dtype=float32"]
HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"


def row(idx, pred=3, radius=0.5):
    return f"{idx}\t3\t{pred}\t{radius!r}\t{int(pred == 3)}\t1.25"


def write(path, rows, settings=SETTINGS, header=HEADER, end="\n"):
    path.write_text("\n".join(settings + [header] + rows) + end)
    return path


def merge(tmp_path, *parts, extra=()):
    out = tmp_path / "merged.tsv"
    code = main(["merge", *map(str, parts), "-o", str(out), *extra])
    return code, out


def test_merges_sorted_and_drops_identical_duplicates(tmp_path, capsys):
    a = write(tmp_path / "out.tsv.part0of2", [row(0), row(40), row(80)])
    b = write(tmp_path / "out.tsv.part1of2", [row(20), row(60), row(40)])  # 40 repeated identically
    code, out = merge(tmp_path, b, a)
    assert code == 0
    lines = out.read_text().splitlines()
    assert lines[0] == HEADER
    assert [int(r.split("\t")[0]) for r in lines[1:]] == [0, 20, 40, 60, 80]
    assert lines[-1] == row(80)
    side = json.loads((tmp_path / "merged.tsv.json").read_text())
    assert side["settings"] == {"rsjax": "certify", "sigma": "0.25", "N": "100000", "dtype": "float32"}
    assert side["columns"] == HEADER.split("\t")


def test_plain_cohen_files_without_settings(tmp_path):
    a = write(tmp_path / "a.tsv", [row(5), row(1)], settings=[])
    b = write(tmp_path / "b.tsv", [row(3)], settings=[])
    code, out = merge(tmp_path, a, b)
    assert code == 0
    assert out.read_text() == "\n".join([HEADER, row(1), row(3), row(5)]) + "\n"


def test_part_setting_may_differ_and_is_dropped(tmp_path):
    a = write(tmp_path / "x.part0of2", [row(0)], settings=SETTINGS + ["# part=0of2"])
    b = write(tmp_path / "x.part1of2", [row(1)], settings=SETTINGS + ["# part=1of2"])
    code, out = merge(tmp_path, a, b)
    assert code == 0
    assert "part" not in json.loads((tmp_path / "merged.tsv.json").read_text())["settings"]


@pytest.mark.parametrize(
    "second, message",
    [
        (dict(rows=[row(40, pred=5)]), "idx 40 appears in"),
        (dict(rows=[row(1)], settings=SETTINGS[:1] + ["# sigma=0.5"] + SETTINGS[2:]), "settings differ"),
        (dict(rows=[row(1)], header=HEADER + "\tsigma"), "header"),
        (dict(rows=[row(1), "7\t3\t3"]), "has 3 cells"),
        (dict(rows=[row(1)], end=""), "unfinished"),
        (dict(rows=["x\t3\t3\t0.1\t1\t1.0"]), "not an integer"),
    ],
)
def test_mismatches_are_one_line_errors(tmp_path, capsys, second, message):
    a = write(tmp_path / "a.tsv", [row(0), row(40)])
    b = write(tmp_path / "b.tsv", **second)
    code, out = merge(tmp_path, a, b)
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.startswith("rsjax merge: error: ") and message in err and err.count("\n") == 1


def test_missing_part_of_a_set(tmp_path, capsys):
    a = write(tmp_path / "o.part0of3", [row(0)])
    b = write(tmp_path / "o.part2of3", [row(2)])
    code, _ = merge(tmp_path, a, b)
    assert code == 2 and "part1of3" in capsys.readouterr().err
    code, out = merge(tmp_path, a, b, extra=["--allow-missing"])
    assert code == 0 and len(out.read_text().splitlines()) == 1 + 2


def test_output_is_protected(tmp_path, capsys):
    a = write(tmp_path / "a.tsv", [row(0)])
    code = main(["merge", str(a), "-o", str(a)])
    assert code == 2 and "also one of the parts" in capsys.readouterr().err
    (tmp_path / "merged.tsv").write_text("keep me\n")
    code, out = merge(tmp_path, a)
    assert code == 2 and out.read_text() == "keep me\n"
    code, out = merge(tmp_path, a, extra=["--overwrite"])
    assert code == 0 and out.read_text().endswith(row(0) + "\n")
