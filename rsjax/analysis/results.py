"""Reading certification and prediction outputs (Cohen, QCRS and rsjax TSV files).

Accepted formats (tab-separated, one header line; spec sections 1.6 and 5.3):

- Cohen ``certify.py``: ``idx label predict radius correct time``.
- QCRS ``certify_qcrs.py``: ``idx label predict radius correct best_sigma pABar time``.
- rsjax ``certify``: Cohen's columns, possibly followed by extra columns (``sigma``,
  ``pA_lower``, ``guarantee``, ``dtype``, ``nonfinite``, ...); the settings are in the sidecar
  ``FILE.json`` (:mod:`rsjax.core.io`). Files of rsjax's earlier layout have ``# key=value``
  comment lines before the header instead, kept as settings.
- Cohen ``predict.py``: ``idx label predict correct time`` (accuracy only, no radius); rsjax
  ``predict`` adds columns after these.

``time`` is either ``str(datetime.timedelta)`` (``0:00:13.736080``, ``1 day, 0:00:01``) or a
plain number of seconds (``15.4``); older Cohen files hold the latter. ``predict`` is -1 on
abstain and ``correct = [predict == label]``, so an abstain counts as wrong.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rsjax.core.io import read_sidecar, read_text
from rsjax.errors import RsjaxError

COHEN_CERTIFY_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
QCRS_COLUMNS = ("idx", "label", "predict", "radius", "correct", "best_sigma", "pABar", "time")
COHEN_PREDICT_COLUMNS = ("idx", "label", "predict", "correct", "time")

_INT_COLUMNS = ("idx", "label", "predict", "correct")
_FLOAT_COLUMNS = ("radius", "best_sigma", "pABar", "sigma", "pA_lower")
_TIMEDELTA = re.compile(r"^(?:(-?\d+) days?, )?(\d+):(\d\d):(\d\d(?:\.\d+)?)$")


@dataclass
class Results:
    """One certification (or prediction) output file, as numpy columns.

    Attributes:
        path: the file read.
        label: short name used in tables and plots.
        kind: ``"cohen"``, ``"qcrs"``, ``"rsjax"`` (Cohen columns plus extras and/or ``#``
            settings) or ``"predict"`` (no radius).
        idx, label_, predict, correct: int arrays, one entry per row.
        radius: float array (``None`` for predict files).
        time: float array of seconds per image (``None`` when the file has no time column).
        sigma: per-image noise level (QCRS ``best_sigma`` or rsjax ``sigma`` column), or ``None``.
        extra: other columns, as float arrays where every value is a number, else as lists of str.
        settings: the sidecar's settings (and recorded info), else ``# key=value`` lines found
            before the header.
    """

    path: Path
    label: str
    kind: str
    idx: np.ndarray
    labels: np.ndarray
    predict: np.ndarray
    correct: np.ndarray
    radius: np.ndarray | None
    time: np.ndarray | None
    sigma: np.ndarray | None
    extra: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of rows (test images)."""
        return int(self.idx.shape[0])

    @property
    def has_radius(self) -> bool:
        return self.radius is not None

    @property
    def sigma_varies(self) -> bool:
        """True when the file carries a per-image sigma that is not constant (QCRS, DDRS, ...)."""
        return self.sigma is not None and bool(np.unique(self.sigma).size > 1)


def parse_time(text: str) -> float:
    """Seconds in a ``time`` cell: ``str(datetime.timedelta)`` (``[D day[s], ]H:MM:SS[.ffffff]``)
    or a plain float number of seconds. Raises ``ValueError`` for anything else or a negative time."""
    s = text.strip()
    m = _TIMEDELTA.match(s)
    if m:
        days, h, mnt, sec = m.groups()
        seconds = (int(days) if days else 0) * 86400 + int(h) * 3600 + int(mnt) * 60 + float(sec)
    else:
        seconds = float(s)  # ValueError if not a number
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a non-negative finite time: {text!r}")
    return seconds


def default_labels(paths) -> list[str]:
    """Short names for files: the last three path components (file suffix such as ``.tsv``
    dropped), e.g. ``noise_0.25/test/sigma_0.25``; more leading components are added while
    two names collide."""
    parts = [list(Path(p).with_suffix("").parts) if Path(p).suffix in (".tsv", ".txt", ".csv")
             else list(Path(p).parts) for p in paths]
    depth = 3
    while True:
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(p) for p in parts):
            return labels
        depth += 1


def _split(line: str) -> list[str]:
    return line.rstrip("\r\n").split("\t")


def _classify(header: list[str], path) -> str:
    """Which known format ``header`` is; raise ``RsjaxError`` naming what is wrong otherwise."""
    h = tuple(header)
    if len(set(h)) != len(h):
        dup = sorted({c for c in h if h.count(c) > 1})
        raise RsjaxError(f"{path}: header repeats column(s) {', '.join(dup)}")
    if h == QCRS_COLUMNS:
        return "qcrs"
    if h[:len(COHEN_PREDICT_COLUMNS)] == COHEN_PREDICT_COLUMNS:
        return "predict"  # rsjax predict adds columns after Cohen's
    if h[:5] == COHEN_CERTIFY_COLUMNS[:5]:
        return "cohen" if h == COHEN_CERTIFY_COLUMNS else "rsjax"
    shown = " ".join(header) if len(header) > 1 else repr(header[0][:60])
    hint = " (is it tab-separated?)" if len(header) == 1 else ""
    raise RsjaxError(
        f"{path}: not a certification or prediction output{hint}: header is {shown}; expected "
        f"'{' '.join(COHEN_CERTIFY_COLUMNS)}' (Cohen/rsjax, rsjax may add columns), "
        f"'{' '.join(QCRS_COLUMNS)}' (QCRS) or '{' '.join(COHEN_PREDICT_COLUMNS)}' (predict)")


def _parse_columns(path, header, rows, first_line):
    """Convert the string cells to typed columns, with one-line errors naming file, line and column."""
    cols = {}
    for j, name in enumerate(header):
        cells = [r[j] for r in rows]
        if name in _INT_COLUMNS:
            out = np.empty(len(cells), dtype=np.int64)
            for i, c in enumerate(cells):
                try:
                    out[i] = int(c)
                except ValueError:
                    raise RsjaxError(f"{path}: line {first_line[i]}: {name} {c!r} is not an integer") from None
        elif name == "time":
            out = np.empty(len(cells), dtype=np.float64)
            for i, c in enumerate(cells):
                try:
                    out[i] = parse_time(c)
                except ValueError:
                    raise RsjaxError(f"{path}: line {first_line[i]}: time {c!r} is neither a number of "
                                     "seconds nor a timedelta like 0:00:13.736080") from None
        else:
            try:
                out = np.array([float(c) for c in cells], dtype=np.float64)
            except ValueError:
                if name in _FLOAT_COLUMNS:
                    bad = next(i for i, c in enumerate(cells) if not _is_float(c))
                    raise RsjaxError(f"{path}: line {first_line[bad]}: {name} {cells[bad]!r} is not a number") from None
                out = cells
        cols[name] = out
    return cols


def _is_float(c):
    try:
        float(c)
        return True
    except ValueError:
        return False


def _check_values(path, cols, lines):
    """Sanity checks that catch swapped columns or corrupt files."""
    def where(mask):
        i = int(np.flatnonzero(mask)[0])
        return f"{path}: line {lines[i]}"

    bad = ~np.isin(cols["correct"], (0, 1))
    if bad.any():
        raise RsjaxError(f"{where(bad)}: correct must be 0 or 1")
    bad = cols["predict"] < -1
    if bad.any():
        raise RsjaxError(f"{where(bad)}: predict must be a class index or -1 (abstain)")
    bad = cols["correct"] != (cols["predict"] == cols["label"])
    if bad.any():
        raise RsjaxError(f"{where(bad)}: correct disagrees with predict == label")
    if "radius" in cols:
        r = cols["radius"]
        bad = ~np.isfinite(r) | (r < 0)
        if bad.any():
            raise RsjaxError(f"{where(bad)}: radius must be a finite number >= 0")
    for name in ("sigma", "best_sigma"):
        if name in cols and not isinstance(cols[name], list):
            bad = ~(cols[name] > 0)
            if bad.any():
                raise RsjaxError(f"{where(bad)}: {name} must be > 0")
    _, first, counts = np.unique(cols["idx"], return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = int(cols["idx"][first[np.argmax(counts > 1)]])
        raise RsjaxError(f"{path}: idx {dup} appears {int(counts.max())} times (concatenated runs? merge them first)")


def load_results(path, label: str | None = None) -> Results:
    """Read one certify/predict output file (Cohen, QCRS or rsjax format; see module docstring).

    Comment lines starting with ``#`` before the header are skipped; ``# key=value`` ones
    become ``Results.settings``. Blank lines are skipped. Any other deviation (unknown header,
    wrong number of cells, non-numeric values, ``correct`` not equal to ``predict == label``,
    negative radius, repeated idx, no rows) raises :class:`RsjaxError` naming the file and line.
    """
    path = Path(path)
    text = read_text(path)

    settings, header, rows, lines = {}, None, [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if header is None and line.startswith("#"):
            body = line[1:].strip()
            if "=" in body:
                k, v = body.split("=", 1)
                settings[k.strip()] = v.strip()
            continue
        if header is None:
            header = [c.strip() for c in _split(line)]
            kind = _classify(header, path)
            continue
        cells = _split(line)
        if [c.strip() for c in cells] == header:
            raise RsjaxError(f"{path}: line {lineno} repeats the header (concatenated files? merge them first)")
        if len(cells) != len(header):
            raise RsjaxError(f"{path}: line {lineno} has {len(cells)} tab-separated cells, the header has {len(header)}")
        rows.append(cells)
        lines.append(lineno)
    if header is None:
        raise RsjaxError(f"{path}: empty file (no header line)")
    if not rows:
        raise RsjaxError(f"{path}: header but no data rows")
    side = read_sidecar(path)
    if side is not None:
        settings = {**side.get("info", {}), **side["settings"]}
    if kind == "cohen" and settings:
        kind = "rsjax"

    cols = _parse_columns(path, header, rows, lines)
    _check_values(path, cols, lines)
    sigma = None
    for name in ("best_sigma", "sigma"):
        if name in cols and not isinstance(cols[name], list):
            sigma = cols[name]
            break
    known = set(_INT_COLUMNS) | {"radius", "time"}
    extra = {k: v for k, v in cols.items() if k not in known}
    return Results(
        path=path,
        label=label if label is not None else default_labels([path])[0],
        kind=kind,
        idx=cols["idx"],
        labels=cols["label"],
        predict=cols["predict"],
        correct=cols["correct"],
        radius=cols.get("radius"),
        time=cols.get("time"),
        sigma=sigma,
        extra=extra,
        settings=settings,
    )


def load_many(paths, labels=None) -> list[Results]:
    """``load_results`` for several files; labels default to :func:`default_labels` of all paths
    together (so that they are unique). ``labels`` must have one entry per path."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise RsjaxError("no result files given")
    if labels is None:
        labels = default_labels(paths)
    elif len(labels) != len(paths):
        raise RsjaxError(f"{len(labels)} labels given for {len(paths)} files")
    return [load_results(p, lab) for p, lab in zip(paths, labels)]
