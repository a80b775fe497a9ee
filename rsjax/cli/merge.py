"""``rsjax merge PARTS... -o OUT``: join per-host certification parts into one Cohen TSV.

Each part is an ``rsjax certify`` / ``rsjax predict`` output (the TSV, header first, and its
``PART.json`` settings sidecar), typically the files ``OUTFILE.part<k>of<n>`` of a multi-host run
(see :mod:`rsjax.distributed`); files of the earlier layout (``# key=value`` lines before the
header) and plain Cohen files without settings work too. OUT gets the header and every row
once, sorted by idx, and ``OUT.json`` with the parts' common settings (both written atomically,
under OUT's lock, see :class:`rsjax.core.io.OutputLock`).

Errors (one line each, exit 2): a part whose settings or header differ from the first part's
(what differs between parts - the part number, the checkpoint path as typed - is not a
setting); a row whose number of cells differs from the header; an unfinished last line (resume
that part first); the same idx twice with different results (rows that agree on every column
but ``time`` are one row, the first part's kept); a missing part of a ``.part<k>of<n>`` set
(unless ``--allow-missing``); OUT existing (unless ``--overwrite``), being one of the parts, or
being written by another process.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from rsjax.core.io import (
    SIDECAR_FORMAT,
    OutputLock,
    parse_settings_lines,
    read_sidecar,
    read_text,
    sidecar_path,
    write_json_atomic,
    write_text_atomic,
)
from rsjax.errors import RsjaxError

PART_RE = re.compile(r"\.part(\d+)of(\d+)$")
PER_PART_SETTINGS = ("part",)  # earlier-layout settings allowed to differ between parts (dropped from OUT)
IGNORED_COLUMNS = ("time",)  # columns that may differ between two copies of one row


def add_parser(parser, name):
    parser.add_argument("parts", nargs="+", metavar="PART", help="certification outputs to merge")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="merged TSV to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--allow-missing", action="store_true",
                        help="merge an incomplete set of OUTFILE.part<k>of<n> files")
    parser.set_defaults(func=run)


def read_part(path):
    """(settings dict, sidecar or None, header cells, rows as lists of str) of one TSV; RsjaxError if malformed."""
    path = Path(path)
    text = read_text(path)
    if text and not text.endswith("\n"):
        raise RsjaxError(f"{path}: the last line is unfinished (a run was interrupted); resume it with the same "
                         "`rsjax certify` command before merging")
    lines = text.split("\n")[:-1] if text else []
    comments = []
    while lines and lines[0].startswith("#"):
        comments.append(lines.pop(0))
    side = read_sidecar(path)
    if side is not None:
        settings = dict(side["settings"])
    else:
        settings = {k: v for k, v in parse_settings_lines(comments).items() if k not in PER_PART_SETTINGS}
    if not lines:
        raise RsjaxError(f"{path}: no header line (expected 'idx<TAB>label<TAB>...')")
    header = lines.pop(0).split("\t")
    if "idx" not in header:
        raise RsjaxError(f"{path}: the header has no idx column: {chr(9).join(header)[:120]!r}")
    rows = []
    for n, line in enumerate(lines, start=len(comments) + 2):
        cells = line.split("\t")
        if len(cells) != len(header):
            raise RsjaxError(f"{path}: line {n} has {len(cells)} cells, the header {len(header)}")
        rows.append(cells)
    return settings, side, header, rows


def check_part_set(paths):
    """With ``.part<k>of<n>`` names: one n for the set, every k in 0..n-1 present, no k twice."""
    found = {}
    for p in paths:
        m = PART_RE.search(str(p))
        if m:
            found.setdefault(int(m.group(2)), []).append(int(m.group(1)))
    if not found:
        return
    if len(found) > 1:
        raise RsjaxError(f"parts of different splits given: .partKof{' and .partKof'.join(map(str, sorted(found)))}")
    (n, ks), = found.items()
    missing = sorted(set(range(n)) - set(ks))
    if missing:
        raise RsjaxError(f"missing part(s) {', '.join(f'part{k}of{n}' for k in missing)} of {n} "
                         "(pass --allow-missing to merge what is there)")


def _first_difference(a: dict, b: dict):
    for k in list(b) + [k for k in a if k not in b]:
        if a.get(k, "(absent)") != b.get(k, "(absent)"):
            return f"{k}: {a.get(k, '(absent)')!r} vs {b.get(k, '(absent)')!r}"
    return None


def merge_parts(paths):
    """Merged (settings dict, header, rows sorted by idx) of the TSV files ``paths`` (module doc)."""
    if not paths:
        raise RsjaxError("no parts to merge")
    settings0 = header0 = first = None
    by_idx = {}
    for p in paths:
        settings, _, header, rows = read_part(p)
        if header0 is None:
            settings0, header0, first = settings, header, p
            compared = [j for j, c in enumerate(header0) if c not in IGNORED_COLUMNS]
        else:
            if header != header0:
                raise RsjaxError(f"{p}: header {chr(9).join(header)[:120]!r} differs from {first}'s "
                                 f"{chr(9).join(header0)[:120]!r}")
            diff = _first_difference(settings, settings0)
            if diff:
                raise RsjaxError(f"{p}: settings differ from {first}'s ({diff}); these parts are not one run")
        j = header0.index("idx")
        for cells in rows:
            try:
                idx = int(cells[j])
            except ValueError:
                raise RsjaxError(f"{p}: idx {cells[j]!r} is not an integer") from None
            if idx in by_idx:
                kept, where = by_idx[idx]
                diff = [header0[k] for k in compared if kept[k] != cells[k]]
                if diff:
                    raise RsjaxError(f"idx {idx} appears in {where} and {p} with different results "
                                     f"({', '.join(diff)})")
                continue
            by_idx[idx] = (cells, p)
    return settings0, header0, [by_idx[i][0] for i in sorted(by_idx)]


def run(args):
    out = Path(args.output)
    parts = [Path(p) for p in args.parts]
    if any(out.resolve() == p.resolve() for p in parts if p.exists()):
        raise RsjaxError(f"{out}: the output is also one of the parts")
    if not out.parent.is_dir():
        raise RsjaxError(f"{out.parent}: no such directory for the output")
    if out.is_dir():
        raise RsjaxError(f"{out}: is a directory")
    with OutputLock(out):
        if out.exists() and not args.overwrite:
            raise RsjaxError(f"{out}: exists (pass --overwrite to replace it)")
        if not args.allow_missing:
            check_part_set(parts)
        settings, header, rows = merge_parts(parts)
        write_json_atomic(sidecar_path(out), {"format": SIDECAR_FORMAT, "columns": header, "settings": settings,
                                              "info": {"merged_from": [str(p) for p in parts]}})
        write_text_atomic(out, "\n".join(["\t".join(header)] + ["\t".join(r) for r in rows]) + "\n")
    print(f"rsjax merge: {len(rows)} rows from {len(parts)} parts -> {out}", file=sys.stderr)
    return 0
