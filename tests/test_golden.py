"""Golden rows: today's results on real MNIST images stay exactly what they were.

The rows under ``tests/data/golden/`` were produced by this file's :func:`run_all` (``python
tests/test_golden.py`` from the worktree root) before the method-config and counter refactor;
see ``tests/data/golden/README.md``. The test reruns every case through the Python API (not the
CLI) and compares every column exactly (there is no ``time`` column here: rows are results only).

Cases (real LeNet of ``../shared/data/models/mnist_lenet_noise0.25``, MNIST test images
0, 7, 14, ..., seed 0, alpha 0.001): Cohen CERTIFY and PREDICT at sigmas 0.25 to 1 (one per image),
and, from sigma0 = 0.25, and one run of each
per-input method (DDRS, QCRS grid search, Insta-RS) with small draw counts, DDRS also through the
memory-based certifier.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "data" / "golden"
IDX = np.arange(0, 7 * 12, 7)
SIGMA, ALPHA, SEED, BATCH = 0.25, 0.001, 0, 400
N0, N = 50, 500
SPREAD = (0.25, 0.5, 0.75, 1.0)


def _shared():
    from rsjax.paths import SHARED_DATA

    return Path(os.environ.get("RSJAX_SHARED_DATA", SHARED_DATA))


def _model(tmp):
    from converters.pytorch import convert_checkpoint
    from rsjax.classifier import load_classifier

    out = Path(tmp) / "lenet"
    if not out.exists():
        convert_checkpoint(_shared() / "models" / "mnist_lenet_noise0.25" / "checkpoint.pth.tar", out,
                           log=lambda s: None)
    return load_classifier(out)


def _images():
    from rsjax.data import load_dataset

    ds = load_dataset("mnist", "test", data_dir=_shared() / "mnist")
    return ds.batch(IDX)


def _fmt(v):
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    if isinstance(v, (np.integer,)):
        return str(int(v))
    return str(v)


def _rows(idx, labels, cols):
    names = list(cols)
    out = [["idx", "label"] + names]
    for i in range(len(idx)):
        out.append([_fmt(int(idx[i])), _fmt(int(labels[i]))] + [_fmt(np.asarray(cols[c])[i]) for c in names])
    return out


def _method_chooser(name, argv, classifier):
    """The sigma chooser of ``--method name`` with the flags ``argv`` (method options only),
    through the method's config dataclass."""
    import argparse

    from rsjax import config
    from rsjax.methods import get_method

    method = get_method(name)
    p = argparse.ArgumentParser()
    config.add_arguments(p, method.config)
    cfg = config.from_args(method.config, p.parse_args(list(argv)))
    return method.build(cfg, classifier, seed=SEED, batch_size=BATCH, n=N)


def _certify(smoother, x, sigma, idx):
    out = smoother.certify(x, sigma, n0=N0, n=N, alpha=ALPHA, key=SEED, idx=idx)
    return out[0], out[1], out[2]


METHOD_CASES = {
    "ddrs": ["--ddrs-steps", "20"],
    "qcrs": ["--gradient_n", "40"],
    "instars": ["--instars-n", "32", "--instars-steps", "2"],
}


def run_all(tmp):
    from rsjax.core.certify import Smoother

    loaded = _model(tmp)
    f, _ = loaded
    x, labels = _images()
    smoother = Smoother(f, 10, BATCH)
    tables = {}
    spread = np.resize(SPREAD, len(IDX))  # one sigma per image: counts well below n as well
    pred, radius, pA = _certify(smoother, x, spread, IDX)
    tables["cohen"] = _rows(IDX, labels, {"predict": pred, "radius": radius, "sigma": spread, "pA_lower": pA})
    p = smoother.predict(x, spread, n=N, alpha=ALPHA, key=SEED, idx=IDX)
    tables["predict"] = _rows(IDX, labels, {"predict": p[0], "pvalue": p[1], "sigma": spread})
    for name, argv in METHOD_CASES.items():
        chooser = _method_chooser(name, argv, loaded)
        sigma, extras = chooser(x, IDX, np.full(len(IDX), SIGMA))
        sigma = np.asarray(sigma, np.float64)
        pred, radius, pA = _certify(smoother, x, sigma, IDX)
        cols = {"predict": pred, "radius": radius, "sigma": sigma, "pA_lower": pA}
        if hasattr(chooser, "finish"):
            extras = chooser.finish(extras, predict=pred, radius=radius, pA_lower=pA)
            assert np.array_equal(extras.pop("pABar"), pA)
        cols.update(extras)
        tables[name] = _rows(IDX, labels, cols)
        if name == "ddrs":
            from rsjax.methods.memory import Memory

            mem = Memory()
            mp, mr = mem.update(x, pred, radius, idx=IDX)
            tables["ddrs_memory"] = _rows(IDX, labels, {"predict": mp, "radius": mr, "sigma": sigma})
    return tables


def _read(path):
    with open(path, newline="") as fh:
        return [row for row in csv.reader(fh, delimiter="\t")]


def _write(path, rows):
    with open(path, "w", newline="") as fh:
        csv.writer(fh, delimiter="\t", lineterminator="\n").writerows(rows)


@pytest.fixture(scope="module")
def tables(tmp_path_factory, shared_data):
    return run_all(tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("case", ["cohen", "predict", "ddrs", "ddrs_memory", "qcrs", "instars"])
def test_rows_are_the_golden_rows(tables, case):
    want = _read(GOLDEN / f"{case}.tsv")
    got = tables[case]
    assert got[0] == want[0], f"{case}: columns changed"
    assert len(got) == len(want)
    for g, w in zip(got[1:], want[1:]):
        assert g == w, f"{case}: row idx {w[0]} changed:\n got {g}\nwant {w}"


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(HERE.parent))
    GOLDEN.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for case, rows in run_all(tmp).items():
            _write(GOLDEN / f"{case}.tsv", rows)
            print(case, len(rows) - 1, "rows")
