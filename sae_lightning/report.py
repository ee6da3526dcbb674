"""Terminal summaries of a run's metrics."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_metrics(metrics: dict[str, float], title: str = "metrics") -> None:
    """Print ``metrics`` as a two-column table, grouped by key prefix."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        value = metrics[key]
        text = f"{int(value)}" if float(value).is_integer() and abs(value) > 1 else f"{value:.4g}"
        table.add_row(key, text)
    Console().print(table)
