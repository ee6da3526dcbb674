"""The terminal tables: final metrics of one run, or of several side by side."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from sae_lightning.report.runs import RunData

SUMMARY_KEYS = (
    "val/fvu",
    "val/explained_variance",
    "val/l0",
    "val/mmcs",
    "val/recovered_frac",
    "val/dead_fraction_eval",
    "train/loss",
    "trainer/global_step",
)
"""Metrics shown first in tables, when a run has them."""


def format_value(value: float) -> str:
    """Integers as integers, everything else with 4 significant digits."""
    value = float(value)
    if value.is_integer() and abs(value) > 1:
        return f"{int(value)}"
    return f"{value:.4g}"


def print_metrics(metrics: dict[str, float], title: str = "metrics") -> None:
    """Print ``metrics`` as a two-column table, grouped by key prefix."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        table.add_row(key, format_value(metrics[key]))
    Console().print(table)


def ordered_keys(metric_sets: Iterable[dict[str, float]]) -> list[str]:
    """The union of the keys: :data:`SUMMARY_KEYS` first, then the rest sorted."""
    keys = set().union(*metric_sets)
    return [k for k in SUMMARY_KEYS if k in keys] + sorted(keys - set(SUMMARY_KEYS))


def print_comparison(runs: Sequence[RunData], title: str = "runs") -> None:
    """Print one table with a column per run."""
    table = Table(title=title)
    table.add_column("metric")
    for run in runs:
        table.add_column(run.label, justify="right")
    for key in ordered_keys(run.metrics for run in runs):
        table.add_row(
            key, *(format_value(r.metrics[key]) if key in r.metrics else "-" for r in runs)
        )
    Console().print(table)
