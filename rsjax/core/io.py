"""Resumable tab-separated output of ``rsjax certify`` / ``rsjax predict``.

File layout::

    # key=value            <- settings of the run, one per line (optional)
    idx<TAB>label<TAB>predict<TAB>radius<TAB>correct<TAB>time[<TAB>extra columns...]
    0<TAB>3<TAB>3<TAB>0.4120925633418373<TAB>1<TAB>0.8325...
    ...

The header is Cohen et al.'s (``idx label predict radius correct time``; PREDICT:
``idx label predict correct time``), so Cohen's analysis code reads it; rsjax adds columns
after ``time``. Floats are written with ``repr`` (full precision; Cohen rounds the radius to
3 significant digits), ``time`` is seconds as a float. Each row is one ``write`` followed by
a flush, so a killed run leaves at most one partial last line.

Resuming (:class:`ResultWriter` without ``overwrite``): the settings lines and the header of
the existing file must equal this run's exactly (otherwise :class:`rsjax.errors.RsjaxError`
says which line differs and to use ``--overwrite`` or another file); a trailing partial line
is cut off; the complete rows are kept and the run continues after the last complete idx.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from rsjax.errors import RsjaxError

CERTIFY_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
PREDICT_COLUMNS = ("idx", "label", "predict", "correct", "time")


def read_text(path) -> str:
    """The UTF-8 text of a result file; RsjaxError naming it if it is missing, not a file or binary."""
    path = Path(path)
    if not path.exists():
        raise RsjaxError(f"{path}: no such file")
    if not path.is_file():
        raise RsjaxError(f"{path}: not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RsjaxError(f"{path}: not a text file (not UTF-8)") from None


def format_value(v) -> str:
    """One TSV cell: ints as ints, floats with ``repr`` (round-trips exactly), strings as they are."""
    if isinstance(v, bool):
        return str(int(v))
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy scalar
        v = v.item()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    s = str(v)
    if "\t" in s or "\n" in s or "\r" in s:
        raise ValueError(f"a cell may not contain a tab or newline: {s!r}")
    return s


def settings_lines(settings: dict) -> list[str]:
    """``# key=value`` lines in the dict's order."""
    out = []
    for k, v in settings.items():
        line = f"# {k}={format_value(v) if v is not None else 'None'}"
        if "\n" in line:
            raise ValueError(f"setting {k} contains a newline")
        out.append(line)
    return out


class ResultWriter:
    """Append rows to ``path``, starting it or resuming it (see module docstring).

    Attributes after construction: ``rows`` (the complete rows already in the file, as lists
    of str), ``resumed`` (True when the file already held the same settings and header),
    ``last_idx`` (idx of the last complete row, or None).
    """

    def __init__(self, path, columns, settings: dict | None = None, *, overwrite: bool = False):
        self.path = Path(path)
        self.columns = tuple(columns)
        if "idx" not in self.columns:
            raise ValueError("the columns must include idx")
        self._prefix = settings_lines(settings or {}) + ["\t".join(self.columns)]
        self.rows: list[list[str]] = []
        self.resumed = False
        if self.path.exists() and not self.path.is_file():
            raise RsjaxError(f"{self.path}: exists and is not a file")
        if self.path.parent and not self.path.parent.is_dir():
            raise RsjaxError(f"{self.path.parent}: no such directory for the output file")
        if self.path.is_file() and not overwrite and self.path.stat().st_size > 0:
            self._resume()
        else:
            self._start()

    @property
    def last_idx(self):
        return int(self.rows[-1][self.columns.index("idx")]) if self.rows else None

    def _start(self):
        self._fh = open(self.path, "w", encoding="utf-8")
        self._fh.write("\n".join(self._prefix) + "\n")
        self._fh.flush()

    def _resume(self):
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RsjaxError(f"{self.path}: exists and is not a text file; use --overwrite or another OUTFILE") from None
        lines = text.split("\n")
        partial = lines.pop()  # '' when the file ends with a newline
        n_pre = len(self._prefix)
        if len(lines) < n_pre and lines == self._prefix[: len(lines)]:
            self._start()  # killed while writing the header: nothing to keep
            return
        for i, (have, want) in enumerate(zip(lines[:n_pre], self._prefix)):
            if have != want:
                raise RsjaxError(
                    f"{self.path} exists with different settings or columns (line {i + 1} is {have[:120]!r}, this run "
                    f"writes {want[:120]!r}); use --overwrite to start over or choose another OUTFILE")
        if len(lines) < n_pre:
            raise RsjaxError(f"{self.path} exists but ends inside its header; use --overwrite or another OUTFILE")
        j = self.columns.index("idx")
        prev = None
        for k, line in enumerate(lines[n_pre:], start=n_pre + 1):
            cells = line.split("\t")
            if len(cells) != len(self.columns):
                raise RsjaxError(f"{self.path}: line {k} has {len(cells)} cells, the header {len(self.columns)}; "
                                 "use --overwrite or another OUTFILE")
            try:
                idx = int(cells[j])
            except ValueError:
                raise RsjaxError(f"{self.path}: line {k}: idx {cells[j]!r} is not an integer") from None
            if prev is not None and idx <= prev:
                raise RsjaxError(f"{self.path}: line {k}: idx {idx} does not follow {prev}; use --overwrite")
            prev = idx
            self.rows.append(cells)
        if partial:
            with open(self.path, "r+b") as fh:  # drop the line a killed run left unfinished
                fh.truncate(len(text.encode("utf-8")) - len(partial.encode("utf-8")))
        self.resumed = True
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, values) -> list[str]:
        """Append one row (values in column order, or a dict by column) and flush it."""
        if isinstance(values, dict):
            missing = [c for c in self.columns if c not in values]
            if missing:
                raise ValueError(f"row lacks column(s) {missing}")
            values = [values[c] for c in self.columns]
        cells = [format_value(v) for v in values]
        if len(cells) != len(self.columns):
            raise ValueError(f"row has {len(cells)} cells, the header {len(self.columns)}")
        self._fh.write("\t".join(cells) + "\n")
        self._fh.flush()
        self.rows.append(cells)
        return cells

    def column(self, name):
        """The values of column ``name`` of all complete rows (strings)."""
        j = self.columns.index(name)
        return [r[j] for r in self.rows]

    def close(self):
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
