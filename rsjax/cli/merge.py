"""``rsjax merge PARTS... -o OUT``: join per-host certification parts into one Cohen TSV.

Each part is an ``rsjax certify`` / ``rsjax predict`` output (``# key=value`` settings lines, the
header ``idx label predict radius correct time ...``, one row per image), typically the files
``OUTFILE.part<k>of<n>`` of a multi-host run (see :mod:`rsjax.parallel`); plain Cohen files
without settings lines work too. The output has the common settings lines and header, then
every row once, sorted by idx.

Errors (one line each, exit 2): a part whose settings or header differ from the first part's
(a ``part`` setting, if present, is allowed to differ and is dropped); a row whose number of
cells differs from the header; an unfinished last line (resume that part first); the same idx
twice with different cells (rows repeated identically are kept once); a missing part of a
``.part<k>of<n>`` set (unless ``--allow-missing``); OUT existing (unless ``--overwrite``) or
being one of the parts.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from rsjax.core.io import read_text
from rsjax.errors import RsjaxError

PART_RE = re.compile(r"\.part(\d+)of(\d+)$")
PER_PART_SETTINGS = ("part",)  # settings allowed to differ between parts (dropped from OUT)


def add_parser(parser, name):
    parser.add_argument("parts", nargs="+", metavar="PART", help="certification outputs to merge")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="merged TSV to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--allow-missing", action="store_true",
                        help="merge an incomplete set of OUTFILE.part<k>of<n> files")
    parser.set_defaults(func=run)


def read_part(path):
    """(settings lines, header cells, rows as lists of str) of one TSV; RsjaxError if malformed."""
    path = Path(path)
    text = read_text(path)
    if text and not text.endswith("\n"):
        raise RsjaxError(f"{path}: the last line is unfinished (a run was interrupted); resume it with the same "
                         "`rsjax certify` command before merging")
    lines = text.split("\n")[:-1] if text else []
    settings = []
    while lines and lines[0].startswith("#"):
        settings.append(lines.pop(0))
    if not lines:
        raise RsjaxError(f"{path}: no header line (expected 'idx<TAB>label<TAB>...')")
    header = lines.pop(0).split("\t")
    if "idx" not in header:
        raise RsjaxError(f"{path}: the header has no idx column: {chr(9).join(header)[:120]!r}")
    rows = []
    for n, line in enumerate(lines, start=len(settings) + 2):
        cells = line.split("\t")
        if len(cells) != len(header):
            raise RsjaxError(f"{path}: line {n} has {len(cells)} cells, the header {len(header)}")
        rows.append(cells)
    return settings, header, rows


def _setting_key(line):
    return line[1:].strip().split("=", 1)[0].strip()


def _common_settings(settings):
    return [s for s in settings if _setting_key(s) not in PER_PART_SETTINGS]


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


def merge_parts(paths):
    """Merged (settings lines, header, rows sorted by idx) of the TSV files ``paths`` (module doc)."""
    if not paths:
        raise RsjaxError("no parts to merge")
    settings0, header0, _ = None, None, None
    by_idx = {}
    for p in paths:
        settings, header, rows = read_part(p)
        common = _common_settings(settings)
        if header0 is None:
            settings0, header0, first = common, header, p
        else:
            if header != header0:
                raise RsjaxError(f"{p}: header {chr(9).join(header)[:120]!r} differs from {first}'s "
                                 f"{chr(9).join(header0)[:120]!r}")
            if common != settings0:
                diff = next((f"{a!r} vs {b!r}" for a, b in zip(common, settings0) if a != b),
                            f"{len(common)} vs {len(settings0)} settings lines")
                raise RsjaxError(f"{p}: settings differ from {first}'s ({diff}); these parts are not one run")
        j = header0.index("idx")
        for cells in rows:
            try:
                idx = int(cells[j])
            except ValueError:
                raise RsjaxError(f"{p}: idx {cells[j]!r} is not an integer") from None
            if idx in by_idx:
                if by_idx[idx][0] != cells:
                    raise RsjaxError(f"idx {idx} appears in {by_idx[idx][1]} and {p} with different results")
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
    if out.exists() and not args.overwrite:
        raise RsjaxError(f"{out}: exists (pass --overwrite to replace it)")
    if not args.allow_missing:
        check_part_set(parts)
    settings, header, rows = merge_parts(parts)
    text = "\n".join(settings + ["\t".join(header)] + ["\t".join(r) for r in rows]) + "\n"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    print(f"rsjax merge: {len(rows)} rows from {len(parts)} parts -> {out}", file=sys.stderr)
    return 0
