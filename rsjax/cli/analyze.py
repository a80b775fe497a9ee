"""``rsjax analyze``: certified accuracy, ACR, abstain rate and timing tables (markdown, LaTeX,
CSV) and certified-accuracy-vs-radius plots from Cohen, QCRS and rsjax certification outputs."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from rsjax.errors import RsjaxError


def parse_radii(text: str) -> np.ndarray:
    """``"0,0.25,0.5"`` or ``"0:1.5:0.25"`` (start:stop:step, stop included), or a mix of both
    separated by commas -> sorted unique radii >= 0."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if ":" in part:
                start, stop, step = (float(x) for x in part.split(":"))
                if not step > 0:
                    raise RsjaxError(f"--radii {part}: step must be > 0")
                k = int(math.floor((stop - start) / step + 1e-9))
                out.extend(np.round(start + np.arange(k + 1) * step, 10).tolist())
            else:
                out.append(float(part))
        except ValueError:
            raise RsjaxError(f"--radii: {part!r} is not a number or start:stop:step") from None
    if not out:
        raise RsjaxError("--radii: no radii given")
    radii = np.unique(np.asarray(out, dtype=np.float64))
    if not np.all(np.isfinite(radii)) or radii[0] < 0:
        raise RsjaxError(f"--radii: radii must be finite and >= 0, got {text}")
    return radii


def add_parser(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="certify outputs (Cohen, QCRS or rsjax TSV) or Cohen predict outputs")
    parser.add_argument("--labels", nargs="+", metavar="LABEL",
                        help="one name per file (default: the last path components, e.g. noise_0.25/test/sigma_0.25)")
    parser.add_argument("--radii", metavar="R,R,...",
                        help="table radii, e.g. 0,0.25,0.5 or 0:1.5:0.25 (default: 0 to the largest radius "
                             "in steps of 0.25, or 0.5/1.0 when that gives more than 10 columns)")
    parser.add_argument("--max-radius", type=float, metavar="R",
                        help="largest radius of the plot and of the default table radii")
    parser.add_argument("--format", choices=("markdown", "latex", "csv"), default="markdown",
                        help="table format (default markdown)")
    parser.add_argument("--plot", metavar="OUT.png",
                        help="write certified accuracy vs radius to OUT.png and OUT.pdf (and OUT_sigma.png/.pdf "
                             "with histograms of per-image sigma for files that have one)")
    parser.add_argument("--title", help="plot title")
    parser.add_argument("--high-prob", nargs=2, type=float, metavar=("ALPHA", "RHO"),
                        help="add Cohen's high-probability certified accuracy rows (e.g. 0.001 0.001)")
    parser.add_argument("--out", metavar="TABLE_FILE", help="also write the table to this file")
    parser.set_defaults(func=run)


def run(args) -> int:
    from rsjax.analysis import default_table_radii, load_many, max_radius, render_table, summarize

    if args.max_radius is not None and not args.max_radius > 0:
        raise RsjaxError(f"--max-radius must be > 0, got {args.max_radius}")
    if args.plot:
        from rsjax.analysis.plots import check_plot_path

        check_plot_path(args.plot)
    if args.out and not Path(args.out).parent.exists():
        raise RsjaxError(f"--out {args.out}: directory {Path(args.out).parent} does not exist")
    results = load_many(args.files, args.labels)
    if args.radii is not None:
        radii = parse_radii(args.radii)
    else:
        top = args.max_radius if args.max_radius is not None else max_radius(results)
        radii = default_table_radii(top)
    summary = summarize(results, radii, high_prob=tuple(args.high_prob) if args.high_prob else None)
    table = render_table(summary, args.format)
    sys.stdout.write(table)
    if args.out:
        out = Path(args.out)
        out.write_text(table)
        print(f"wrote {out}", file=sys.stderr)
    if args.plot:
        from rsjax.analysis.plots import plot_certified_accuracy, plot_sigma_histograms, sigma_plot_path

        written = plot_certified_accuracy(results, args.plot, max_r=args.max_radius, title=args.title)
        written += plot_sigma_histograms(results, sigma_plot_path(args.plot))
        for p in written:
            print(f"wrote {p}", file=sys.stderr)
    return 0
