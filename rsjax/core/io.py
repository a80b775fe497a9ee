"""Resumable tab-separated output of ``rsjax certify`` / ``rsjax predict``, with its settings sidecar.

File layout (``OUTFILE``, read as is by ``pandas.read_csv(OUTFILE, delimiter="\\t")``, the call
in Cohen's ``analyze.py``)::

    idx<TAB>label<TAB>predict<TAB>radius<TAB>correct<TAB>time[<TAB>extra columns...]
    0<TAB>7<TAB>7<TAB>0.4120925633418373<TAB>1<TAB>0.8325...
    ...

and beside it ``OUTFILE.json`` (:func:`sidecar_path`), written atomically::

    {"format": "rsjax-results/2", "columns": [...], "settings": {...}, "info": {...}}

The header is Cohen et al.'s (``idx label predict radius correct time``; PREDICT:
``idx label predict correct time``), rsjax's columns follow ``time``. Floats are written with
``repr`` (full precision), ``time`` is seconds as a float. Each row is one ``os.write`` of the
whole line on an unbuffered descriptor, so a killed run or a full disk leaves at most one
partial last line, which the next resume cuts off.

``settings`` are what must be equal for a run to continue a file; ``info`` is recorded but
not compared (e.g. the checkpoint path as typed: the model is identified by its checksum in
the settings). Resuming (:class:`ResultWriter` without ``overwrite``): the sidecar's settings
and columns must equal this run's (otherwise :class:`rsjax.errors.RsjaxError` names the first
setting that differs and says to use ``--overwrite`` or another file); the complete rows are
kept and the run continues after the last complete idx.

Files of the earlier layout (``# key=value`` settings lines before the header, no sidecar) are
read by :func:`read_table` and resumed: their settings lines are compared with
``legacy_settings`` and the file is migrated (sidecar written, comment lines dropped) before
the first new row.

One writer per file: :class:`OutputLock` holds an exclusive ``fcntl.flock`` on ``OUTFILE.lock``
(which records the holder's pid) for the whole run; a second writer stops at once with
:class:`OutputBusyError` naming the file and that pid. Operating-system failures (read-only
directory, permission denied, disk full) become :class:`OutputError`, one line naming the file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
from pathlib import Path

from rsjax.errors import RsjaxError

CERTIFY_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
PREDICT_COLUMNS = ("idx", "label", "predict", "correct", "time")
SIDECAR_FORMAT = "rsjax-results/2"
SIDECAR_SUFFIX = ".json"
LOCK_SUFFIX = ".lock"


class OutputError(RsjaxError):
    """An output file cannot be written (read-only, permission denied, disk full...)."""


class OutputBusyError(RsjaxError):
    """Another process holds the output file's lock."""


def os_error(path, e: OSError) -> OutputError:
    """One line naming ``path`` and the operating system's reason."""
    reason = e.strerror or str(e)
    name = errno.errorcode.get(e.errno, "") if e.errno else ""
    return OutputError(f"{path}: {reason}{f' ({name})' if name else ''}; rows already written are kept, "
                       "run the same command again once it is fixed to resume")


def sidecar_path(path) -> Path:
    """``OUTFILE.json``: the settings of the result file ``OUTFILE``."""
    return Path(os.fspath(path) + SIDECAR_SUFFIX)


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
    except OSError as e:
        raise RsjaxError(f"{path}: cannot read ({e.strerror or e})") from None


def format_value(v) -> str:
    """One TSV cell: ints as ints, floats with ``repr`` (round-trips exactly), strings as they are."""
    if isinstance(v, bool):
        return str(int(v))
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy scalar
        v = v.item()
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    s = str(v)
    if "\t" in s or "\n" in s or "\r" in s:
        raise ValueError(f"a cell may not contain a tab or newline: {s!r}")
    return s


def settings_lines(settings: dict) -> list[str]:
    """``# key=value`` lines in the dict's order (the earlier layout's settings)."""
    out = []
    for k, v in settings.items():
        line = f"# {k}={format_value(v) if v is not None else 'None'}"
        if "\n" in line:
            raise ValueError(f"setting {k} contains a newline")
        out.append(line)
    return out


def parse_settings_lines(lines) -> dict:
    """``{key: value string}`` of ``# key=value`` lines (lines without ``=`` are skipped)."""
    out = {}
    for line in lines:
        body = line[1:].strip()
        if "=" in body:
            k, v = body.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def write_json_atomic(path, obj):
    """Write ``obj`` as JSON to ``path`` through a temporary file and ``os.replace``: a reader
    sees the old file or the new one, never half of one. OSError becomes :class:`OutputError`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode("utf-8")
    try:
        _write_new(tmp, data)
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        raise os_error(path, e) from None


def write_text_atomic(path, text: str):
    """Like :func:`write_json_atomic` for a text file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _write_new(tmp, text.encode("utf-8"))
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        raise os_error(path, e) from None


def _write_new(path, data: bytes):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd, data: bytes):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def read_sidecar(path):
    """The sidecar dict of result file ``path``, or None when there is none."""
    side = sidecar_path(path)
    if not side.exists():
        return None
    try:
        data = json.loads(read_text(side))
    except json.JSONDecodeError as e:
        raise RsjaxError(f"{side}: not valid JSON ({e.msg} at line {e.lineno}); use --overwrite or another OUTFILE") \
            from None
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise RsjaxError(f"{side}: not an rsjax results sidecar (no 'settings' object)")
    return data


def read_table(path):
    """``(settings dict, header cells, rows, partial, first row line)`` of a result file.

    Settings come from the sidecar (``settings`` merged over ``info``) when there is one, else
    from ``# key=value`` lines before the header (earlier layout, values as strings), else
    ``{}`` (a Cohen file). ``partial`` is an unfinished last line ('' when none).
    """
    text = read_text(path)
    lines = text.split("\n")
    partial = lines.pop()
    comments = []
    while lines and lines[0].startswith("#"):
        comments.append(lines.pop(0))
    side = read_sidecar(path)
    if side is not None:
        settings = {**side.get("info", {}), **side["settings"]}
    else:
        settings = parse_settings_lines(comments)
    if not lines:
        return settings, None, [], partial, len(comments) + 2
    header = lines.pop(0).split("\t")
    return settings, header, [line.split("\t") for line in lines], partial, len(comments) + 2


# ------------------------------------------------------------------------------------ locking

class OutputLock:
    """An exclusive lock on ``path`` for this process: ``fcntl.flock`` on ``path.lock``.

    The lock file holds the holder's pid; a second :class:`OutputLock` on the same path (in
    any process) raises :class:`OutputBusyError` at once, naming the file and that pid. The
    lock file is removed on :meth:`release`; a new holder checks that the file it locked is
    still the one at ``path.lock`` (else it retries), so two holders can never both win.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.lock_path = Path(os.fspath(path) + LOCK_SUFFIX)
        self._fd = None
        for _ in range(20):
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise os_error(self.lock_path, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise OutputBusyError(
                    f"{self.path}: another rsjax process (pid {holder or 'unknown'}) is writing this file "
                    f"(lock {self.lock_path}); wait for it to finish or choose another output") from None
            except OSError as e:
                os.close(fd)
                raise os_error(self.lock_path, e) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                break
            os.close(fd)  # the holder removed it between our open and flock: take the new one
        else:
            raise OutputBusyError(f"{self.path}: could not take the lock {self.lock_path}")
        try:
            os.ftruncate(fd, 0)
            _write_all(fd, f"{os.getpid()}\n".encode())
        except OSError as e:
            self.release()
            raise os_error(self.lock_path, e) from None

    def release(self):
        if self._fd is None:
            return
        _unlink_quietly(self.lock_path)
        try:
            os.close(self._fd)
        finally:
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _read_pid(fd):
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


# ------------------------------------------------------------------------------------ writer

def _differences(have: dict, want: dict):
    keys = list(want) + [k for k in have if k not in want]
    return [(k, have.get(k, "(absent)"), want.get(k, "(absent)")) for k in keys if have.get(k, "(absent)")
            != want.get(k, "(absent)")]


class ResultWriter:
    """Append rows to ``path``, starting it or resuming it (see module docstring).

    Args:
      path: the TSV; its sidecar is ``path.json``.
      columns: header cells (must include ``idx``).
      settings: JSON-able dict compared on resume.
      info: JSON-able dict recorded in the sidecar, not compared.
      legacy_settings: the ``# key=value`` settings an earlier rsjax would have written for this
        run (compared with such a file's lines before it is migrated); ``legacy_same`` maps a key
        to a function ``(file value, this run's value) -> bool`` for keys compared otherwise;
        ``legacy_missing``: columns such files lack, left empty in their migrated rows;
        ``legacy_optional``: settings such a file may lack (options added since, at their default).
      overwrite: start over (the old file and sidecar are replaced).
      lock: hold :class:`OutputLock` on ``path`` until :meth:`close`.

    Attributes after construction: ``rows`` (the complete rows already in the file, as lists
    of str), ``resumed`` (True when a file was continued), ``migrated`` (True when an
    earlier-layout file was converted), ``last_idx`` (idx of the last complete row, or None).
    """

    def __init__(self, path, columns, settings: dict | None = None, *, info: dict | None = None,
                 legacy_settings: dict | None = None, legacy_same: dict | None = None,
                 legacy_missing: tuple = (), legacy_optional: tuple = (), overwrite: bool = False,
                 lock: bool = True):
        self.path = Path(path)
        self.columns = tuple(columns)
        if "idx" not in self.columns:
            raise ValueError("the columns must include idx")
        self.settings = dict(settings or {})
        self.info = dict(info or {})
        self.legacy_settings = legacy_settings
        self.legacy_same = legacy_same or {}
        self.legacy_missing = tuple(legacy_missing)
        self.legacy_optional = set(legacy_optional)
        self.rows: list[list[str]] = []
        self.resumed = self.migrated = False
        self._fd = None
        if self.path.exists() and not self.path.is_file():
            raise RsjaxError(f"{self.path}: exists and is not a file")
        parent = self.path.parent
        if not parent.is_dir():
            raise RsjaxError(f"{parent}: no such directory for the output file")
        self._lock = OutputLock(self.path) if lock else None
        try:
            if self.path.is_file() and not overwrite and self.path.stat().st_size > 0:
                self._resume()
            else:
                self._start()
        except BaseException:
            self._release_lock()
            raise

    @property
    def last_idx(self):
        return int(self.rows[-1][self.columns.index("idx")]) if self.rows else None

    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.path)

    def _sidecar_obj(self):
        return {"format": SIDECAR_FORMAT, "columns": list(self.columns), "settings": self.settings,
                "info": self.info}

    def _open_append(self):
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise os_error(self.path, e) from None

    def _start(self):
        write_json_atomic(self.sidecar, self._sidecar_obj())
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise os_error(self.path, e) from None
        self._fd = fd
        self._append("\t".join(self.columns) + "\n")

    def _resume(self):
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RsjaxError(f"{self.path}: exists and is not a text file; use --overwrite or another OUTFILE") from None
        except OSError as e:
            raise os_error(self.path, e) from None
        lines = text.split("\n")
        partial = lines.pop()  # '' when the file ends with a newline
        comments = []
        while lines and lines[0].startswith("#"):
            comments.append(lines.pop(0))
        header = "\t".join(self.columns)
        fill = []  # positions of the columns an earlier-layout file lacks
        if comments:
            self._check_legacy(comments)
            old = [c for c in self.columns if c not in self.legacy_missing]
            if lines and lines[0] == "\t".join(old) and len(old) < len(self.columns):
                lines[0] = header
                fill = [j for j, c in enumerate(self.columns) if c in self.legacy_missing]
        else:
            self._check_sidecar()
        if not lines:
            if partial and not header.startswith(partial):
                raise RsjaxError(f"{self.path} exists but its first line is not this run's header; "
                                 "use --overwrite or another OUTFILE")
            self._start()  # killed while writing the header: nothing to keep
            return
        if lines[0] != header:
            raise RsjaxError(f"{self.path} exists with other columns ({lines[0][:120]!r}, this run writes "
                             f"{header[:120]!r}); use --overwrite to start over or choose another OUTFILE")
        first = len(comments) + 2
        j = self.columns.index("idx")
        prev = None
        for k, line in enumerate(lines[1:], start=first):
            cells = line.split("\t")
            for pos in fill:
                cells.insert(pos, "")
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
        self.resumed = True
        if comments:
            # sidecar first: a crash before the TSV is rewritten leaves an earlier-layout file,
            # which the next resume migrates again
            write_json_atomic(self.sidecar, self._sidecar_obj())
            write_text_atomic(self.path, "\n".join([header] + ["\t".join(r) for r in self.rows]) + "\n")
            self.migrated = True
        elif partial:
            try:  # drop the line a killed run left unfinished
                with open(self.path, "r+b") as fh:
                    fh.truncate(len(text.encode("utf-8")) - len(partial.encode("utf-8")))
            except OSError as e:
                raise os_error(self.path, e) from None
        self._open_append()

    def _check_sidecar(self):
        side = read_sidecar(self.path)
        if side is None:
            raise RsjaxError(f"{self.path} exists without its settings file {self.sidecar.name} (not written by "
                             "this run's command); use --overwrite to start over or choose another OUTFILE")
        if side.get("columns") != list(self.columns):
            raise RsjaxError(f"{self.path} exists with other columns ({' '.join(map(str, side.get('columns') or []))[:120]}"
                             f"); use --overwrite to start over or choose another OUTFILE")
        diff = _differences(side["settings"], json.loads(json.dumps(self.settings)))
        if diff:
            k, have, want = diff[0]
            raise RsjaxError(f"{self.path} exists with different settings ({k}: the file has {have!r}, this run "
                             f"{want!r}); use --overwrite to start over or choose another OUTFILE")

    def _check_legacy(self, comments):
        if self.legacy_settings is None:
            raise RsjaxError(f"{self.path} has '# key=value' lines of an earlier rsjax but this writer cannot "
                             "compare them; use --overwrite or another OUTFILE")
        have = parse_settings_lines(comments)
        want = parse_settings_lines(settings_lines(self.legacy_settings))
        for k in list(want) + [k for k in have if k not in want]:
            if k not in have and k in self.legacy_optional:
                continue
            a, b = have.get(k, "(absent)"), want.get(k, "(absent)")
            same = self.legacy_same[k](a, b) if k in self.legacy_same and k in have and k in want else a == b
            if not same:
                raise RsjaxError(f"{self.path} exists with different settings ({k}: the file has {a!r}, this run "
                                 f"{b!r}); use --overwrite to start over or choose another OUTFILE")

    def _append(self, text: str):
        try:
            _write_all(self._fd, text.encode("utf-8"))
        except OSError as e:
            raise os_error(self.path, e) from None

    def write(self, values) -> list[str]:
        """Append one row (values in column order, or a dict by column) in one write."""
        if isinstance(values, dict):
            missing = [c for c in self.columns if c not in values]
            if missing:
                raise ValueError(f"row lacks column(s) {missing}")
            values = [values[c] for c in self.columns]
        cells = [format_value(v) for v in values]
        if len(cells) != len(self.columns):
            raise ValueError(f"row has {len(cells)} cells, the header {len(self.columns)}")
        self._append("\t".join(cells) + "\n")
        self.rows.append(cells)
        return cells

    def column(self, name):
        """The values of column ``name`` of all complete rows (strings)."""
        j = self.columns.index(name)
        return [r[j] for r in self.rows]

    def _release_lock(self):
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def close(self):
        """Sync and close the file, then release the lock (an fsync failure is ignored: every
        row was already handed to the operating system in one write)."""
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        self._release_lock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
