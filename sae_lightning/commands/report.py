"""``sae-lightning report RUN_DIR [RUN_DIR ...] [--out report.html]``.

Prints the final metrics (one table, a column per run when there are several) and writes a
static ``report.html`` with inline SVG plots: loss curves, FVU and L0 curves, the L0-vs-FVU
Pareto points of the runs side by side, the feature-density histogram, and, for synthetic
data, the learned-vs-true atom image, and a link to each run's feature browser when
``sae-lightning inspect`` wrote one. A folder that is not itself a run is searched for runs
(``runs/quickstart`` reports every ``version_N``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sae_lightning.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="summarise runs: metrics table and a static report.html",
        description="Print the final metrics of one or more runs and write report.html "
        "(no server or network needed to view it).",
    )
    p.add_argument("runs", nargs="+", help="run folders (runs/<name>/version_N) or folders of runs")
    p.add_argument(
        "--out",
        "-o",
        default=None,
        help="HTML file to write; default <run>/report.html for one run, ./report.html for several",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from sae_lightning.report import (
        find_runs,
        print_comparison,
        print_metrics,
        read_run,
        run_labels,
        write_report,
    )

    if rest:
        raise ConfigError(rest[0], "unexpected argument for `report`")
    try:
        paths = find_runs(args.runs)
    except FileNotFoundError as err:
        raise ConfigError("runs", str(err)) from None
    runs = [read_run(p, label) for p, label in zip(paths, run_labels(paths), strict=True)]
    if len(runs) == 1:
        print_metrics(runs[0].metrics, title=f"{runs[0].label}: final metrics")
        default = runs[0].path / "report.html"
    else:
        print_comparison(runs, title=f"{len(runs)} runs: final metrics")
        default = Path("report.html")
    out = write_report(runs, args.out or default)
    print(f"\nwrote {out}")
    return 0
