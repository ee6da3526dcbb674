"""Run summaries: the terminal metrics tables and a static ``report.html``.

The report reads what a run leaves in its folder (:mod:`~sae_lightning.report.runs`), prints
tables (:mod:`~sae_lightning.report.tables`) and writes one page
(:mod:`~sae_lightning.report.html`) whose plots are inline SVG
(:mod:`~sae_lightning.report.svg`), so the page needs no server, no script and no network.
"""

from sae_lightning.report.html import render_report, write_report
from sae_lightning.report.runs import (
    ATOMS_TAG,
    DENSITY_TAG,
    EVENTS_GLOB,
    Histogram,
    RunData,
    find_runs,
    read_run,
    rebin,
    run_labels,
)
from sae_lightning.report.svg import (
    PALETTE,
    Series,
    histogram_chart,
    line_chart,
    nice_ticks,
    pareto_front,
    scatter_chart,
)
from sae_lightning.report.tables import (
    SUMMARY_KEYS,
    format_value,
    ordered_keys,
    print_comparison,
    print_metrics,
)

__all__ = [
    "ATOMS_TAG",
    "DENSITY_TAG",
    "EVENTS_GLOB",
    "PALETTE",
    "SUMMARY_KEYS",
    "Histogram",
    "RunData",
    "Series",
    "find_runs",
    "format_value",
    "histogram_chart",
    "line_chart",
    "nice_ticks",
    "ordered_keys",
    "pareto_front",
    "print_comparison",
    "print_metrics",
    "read_run",
    "rebin",
    "render_report",
    "run_labels",
    "scatter_chart",
    "write_report",
]
