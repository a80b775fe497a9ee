"""Analysis of certification outputs: certified accuracy, ACR, tables and plots (spec 1.6, 1.7, 5.3).

Typical use::

    from rsjax.analysis import load_many, summarize, render_table, plot_certified_accuracy
    results = load_many(["noise_0.25/test/sigma_0.25", "noise_0.50/test/sigma_0.50"])
    summary = summarize(results, radii=[0, 0.25, 0.5])
    print(render_table(summary, "markdown"))
    plot_certified_accuracy(results, "curves.png")

Matplotlib is imported only by the plotting functions.
"""

from .metrics import (
    Summary,
    abstain_rate,
    acr,
    best_per_radius,
    certified_accuracy,
    clean_accuracy,
    default_table_radii,
    envelope,
    high_prob_accuracy,
    high_prob_correction,
    max_radius,
    mean_time,
    radius_grid,
    summarize,
)
from .results import Results, default_labels, load_many, load_results, parse_time
from .tables import FORMATS, render_table, table_rows


def plot_certified_accuracy(*args, **kwargs):
    """See :func:`rsjax.analysis.plots.plot_certified_accuracy` (imports matplotlib on first use)."""
    from .plots import plot_certified_accuracy as f

    return f(*args, **kwargs)


def plot_sigma_histograms(*args, **kwargs):
    """See :func:`rsjax.analysis.plots.plot_sigma_histograms` (imports matplotlib on first use)."""
    from .plots import plot_sigma_histograms as f

    return f(*args, **kwargs)


__all__ = [
    "FORMATS", "Results", "Summary", "abstain_rate", "acr", "best_per_radius", "certified_accuracy",
    "clean_accuracy", "default_labels", "default_table_radii", "envelope", "high_prob_accuracy",
    "high_prob_correction", "load_many", "load_results", "max_radius", "mean_time", "parse_time",
    "plot_certified_accuracy", "plot_sigma_histograms", "radius_grid", "render_table", "summarize",
    "table_rows",
]
