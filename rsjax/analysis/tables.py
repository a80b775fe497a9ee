"""Rendering a :class:`~rsjax.analysis.metrics.Summary` as a markdown, LaTeX or CSV table.

Rows: one per file, then (with more than one file) the envelope ``max over files`` of the
certified accuracy, then (with ``--high-prob``) one HighProbAccuracy row per file. Columns:
label, N, the clean accuracy when r = 0 is not among the radii (at r = 0 the certified
accuracy *is* the clean accuracy), certified accuracy at each radius, ACR, abstain rate,
mean seconds per image. At each radius the best file is marked like Cohen's tables: ``*``
after the number in markdown and CSV, ``\\textbf{}`` in LaTeX.
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np

from rsjax.errors import RsjaxError

from .metrics import Summary

FORMATS = ("markdown", "latex", "csv")


def format_radius(r: float) -> str:
    """Shortest decimal for a radius: 0, 0.25, 1.5."""
    return f"{float(r):g}"


def format_seconds(t: float) -> str:
    """Seconds per image: one decimal from 1 s up (14.1), three below (0.153); '-' if unknown."""
    if t is None or math.isnan(t):
        return "-"
    return f"{t:.1f}" if t >= 1 else f"{t:.3f}"


def _num(x: float, digits: int = 3) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _latex_escape(s: str) -> str:
    out = []
    for ch in s:
        if ch in "&%$#_{}":
            out.append("\\" + ch)
        elif ch == "~":
            out.append(r"\textasciitilde{}")
        elif ch == "^":
            out.append(r"\textasciicircum{}")
        elif ch == "\\":
            out.append(r"\textbackslash{}")
        else:
            out.append(ch)
    return "".join(out)


def table_rows(summary: Summary, fmt: str = "markdown"):
    """The table as (header, rows) of strings, with best-per-radius marks in the style of ``fmt``."""
    if fmt not in FORMATS:
        raise RsjaxError(f"unknown table format {fmt!r}; use one of {', '.join(FORMATS)}")
    radii = summary.radii
    with_clean = not np.any(radii == 0)
    pct = r"\%" if fmt == "latex" else "%"

    def mark(text, best):
        if not best:
            return text
        return r"\textbf{" + text + "}" if fmt == "latex" else text + "*"

    def rad_head(r):
        return f"$r = {format_radius(r)}$" if fmt == "latex" else f"r={format_radius(r)}"

    header = ["file", "N"] + (["clean"] if with_clean else []) + [rad_head(r) for r in radii]
    header += ["ACR", "abstain", "s/img"]
    rows = []
    for i, res in enumerate(summary.results):
        row = [res.label, str(res.n)]
        if with_clean:
            row.append(_num(summary.clean[i]))
        row += [mark(_num(a), b) for a, b in zip(summary.accuracy[i], summary.best[i])]
        row += [_num(summary.acr[i]), f"{100 * summary.abstain[i]:.1f}{pct}", format_seconds(summary.seconds[i])]
        rows.append(row)
    if len(summary.results) > 1:
        row = ["envelope (max)", "-"] + (["-"] if with_clean else [])
        row += [_num(a) for a in summary.envelope] + ["-", "-", "-"]
        rows.append(row)
    if summary.high_prob is not None:
        alpha, rho = summary.alpha_rho
        for i, res in enumerate(summary.results):
            row = [f"{res.label} (high-prob, alpha={alpha:g}, rho={rho:g})", str(res.n)]
            row += ["-"] if with_clean else []
            row += [_num(a) for a in summary.high_prob[i]] + ["-", "-", "-"]
            rows.append(row)
    if fmt == "latex":
        rows = [[_latex_escape(r[0])] + r[1:] for r in rows]
        header = ["file"] + header[1:]
    return header, rows


def render_table(summary: Summary, fmt: str = "markdown") -> str:
    """The summary as a markdown, LaTeX (booktabs tabular) or CSV table; ends with a newline."""
    header, rows = table_rows(summary, fmt)
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines) + "\n"
    if fmt == "latex":
        lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
                 " & ".join(header) + r" \\", r"\midrule"]
        n_files = len(summary.results)
        for k, r in enumerate(rows):
            if k == n_files and k < len(rows):
                lines.append(r"\midrule")
            lines.append(" & ".join(r) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()
