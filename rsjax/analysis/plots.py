"""Plots: certified accuracy against radius, and histograms of per-image sigma.

Figures are drawn with :class:`matplotlib.figure.Figure` and saved through the Agg (PNG) and
PDF canvases, so nothing here needs a display or changes pyplot's global backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rsjax.errors import RsjaxError

from .metrics import certified_accuracy, envelope, max_radius, radius_grid

GRID_STEP = 0.01  # Cohen's analyze.py plots on a 0.01 radius grid


def _outputs(out) -> tuple[Path, Path]:
    """(png, pdf) paths for ``--plot OUT``: OUT.png or OUT.pdf give both; no suffix adds them."""
    out = Path(out)
    if out.suffix.lower() in (".png", ".pdf"):
        stem = out.with_suffix("")
    elif out.suffix == "":
        stem = out
    else:
        raise RsjaxError(f"--plot {out}: the plot file must end in .png (a .pdf is written next to it)")
    if stem.parent and not stem.parent.exists():
        raise RsjaxError(f"--plot {out}: directory {stem.parent} does not exist")
    return stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".pdf")


def check_plot_path(out) -> tuple[Path, Path]:
    """Raise ``RsjaxError`` now (before any work) if ``--plot OUT`` cannot be written; returns (png, pdf)."""
    return _outputs(out)


def _save(fig, out) -> list[Path]:
    png, pdf = _outputs(out)
    fig.savefig(png, dpi=150, bbox_inches="tight")
    fig.savefig(pdf, bbox_inches="tight")
    return [png, pdf]


def _figure(**kw):
    from matplotlib.figure import Figure

    return Figure(**kw)


def plot_certified_accuracy(results, out, max_r: float | None = None, title: str | None = None) -> list[Path]:
    """Certified accuracy A(r) = mean_i [correct_i and R_i >= r] on the grid r = 0, 0.01, ...,
    ``max_r`` (default: the largest certified radius), one line per certify file plus, with two
    or more files, their upper envelope max_files A(r) (dashed). Predict files (no radius) are
    skipped. Writes ``out`` as PNG and a PDF next to it; returns both paths."""
    curves = [r for r in results if r.radius is not None]
    if not curves:
        raise RsjaxError("--plot needs at least one certification file (predict files have no radius)")
    if max_r is None:
        max_r = max_radius(curves)
    grid = radius_grid(max(max_r, GRID_STEP), GRID_STEP)
    acc = np.stack([certified_accuracy(r, grid) for r in curves])

    fig = _figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    for res, a in zip(curves, acc):
        ax.plot(grid, a, lw=1.6, label=res.label)
    if len(curves) > 1:
        ax.plot(grid, envelope(acc), color="black", ls="--", lw=1.2, label="envelope (max)")
    ax.set_xlim(0, grid[-1])
    ax.set_ylim(0, 1)
    ax.set_xlabel(r"radius $r$ ($\ell_2$)")
    ax.set_ylabel("certified accuracy")
    n = sorted({r.n for r in curves})
    ax.set_title(title or f"Approximate certified accuracy (N = {', '.join(map(str, n))} images)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper right")
    return _save(fig, out)


def sigma_plot_path(out) -> Path:
    """``<stem>_sigma.png`` next to the accuracy plot ``<stem>.png``."""
    png, _ = _outputs(out)
    return png.with_name(png.stem + "_sigma.png")


def plot_sigma_histograms(results, out) -> list[Path]:
    """Histogram of the per-image sigma (QCRS ``best_sigma`` / rsjax ``sigma`` column) of every
    file whose sigma varies, one panel each, with the median marked. Writes ``out`` (PNG) and
    a PDF next to it; returns both paths, or ``[]`` when no file has a varying sigma."""
    files = [r for r in results if r.sigma_varies]
    if not files:
        return []
    fig = _figure(figsize=(6.4, 2.6 * len(files) + 0.6))
    axes = [fig.add_subplot(len(files), 1, k + 1) for k in range(len(files))]
    for ax, res in zip(axes, files):
        s = res.sigma
        ax.hist(s, bins=np.histogram_bin_edges(s, bins="auto"), color="tab:blue", alpha=0.8)
        med = float(np.median(s))
        ax.axvline(med, color="black", ls="--", lw=1, label=f"median {med:.3g}")
        ax.set_title(f"{res.label}: per-image $\\sigma$ ({res.n} images)", fontsize="medium")
        ax.set_ylabel("images")
        ax.legend(fontsize="small")
    axes[-1].set_xlabel(r"chosen $\sigma$")
    fig.tight_layout()
    return _save(fig, out)
