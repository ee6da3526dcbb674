"""The static ``report.html`` page: metrics table, curves, Pareto points, density, atoms."""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from sae_lightning.report.runs import RunData
from sae_lightning.report.svg import (
    DASHES,
    PALETTE,
    Series,
    histogram_chart,
    line_chart,
    scatter_chart,
)
from sae_lightning.report.tables import format_value, ordered_keys

INSPECT_INDEX = "inspect/index.html"
"""Where ``sae-lightning inspect`` writes a run's feature browser, inside the run folder."""

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.grid-plots { display: flex; flex-wrap: wrap; gap: 12px; }
svg.plot { background: #fff; border: 1px solid #e3e3e3; }
svg .title { font-size: 13px; font-weight: 600; } svg .tick { font-size: 10px; fill: #555; }
svg .label, svg .legend { font-size: 11px; fill: #333; }
svg .area { fill: #fafafa; stroke: #ccc; } svg .grid { stroke: #e6e6e6; }
table { border-collapse: collapse; margin: 8px 0; }
td, th { border: 1px solid #ddd; padding: 3px 10px; text-align: right; }
td:first-child, th:first-child { text-align: left; font-family: monospace; }
.note { color: #666; }
img.atoms { image-rendering: pixelated; border: 1px solid #ddd; max-width: 100%; }
"""


def _curve(run: RunData, tag: str, color: str, dash: str = "", label: str | None = None) -> Series:
    points = [(float(s), v) for s, v in run.scalars.get(tag, [])]
    return Series(label or f"{run.label} {tag}", points, color, dash)


def _metrics_table(runs: Sequence[RunData]) -> str:
    head = "".join(f"<th>{html.escape(r.label)}</th>" for r in runs)
    rows = []
    for key in ordered_keys(r.metrics for r in runs):
        cells = "".join(
            f"<td>{format_value(r.metrics[key]) if key in r.metrics else '-'}</td>" for r in runs
        )
        rows.append(f"<tr><td>{html.escape(key)}</td>{cells}</tr>")
    return f'<table class="metrics"><tr><th>metric</th>{head}</tr>{"".join(rows)}</table>'


def _curves_section(runs: Sequence[RunData], colors: dict[str, str]) -> str:
    several = len(runs) > 1
    curves = [
        line_chart(
            "loss",
            "training loss (train/loss)",
            [_curve(r, "train/loss", colors[r.label], label=r.label) for r in runs],
            ylabel="loss",
        )
    ]
    for r in runs:
        terms = sorted(t for t in r.scalars if t.startswith("train/loss/"))
        curves.append(
            line_chart(
                "loss-terms",
                f"loss terms: {r.label}" if several else "loss terms (train/loss/*)",
                [
                    _curve(r, t, PALETTE[i % len(PALETTE)], label=t.removeprefix("train/loss/"))
                    for i, t in enumerate(terms)
                ],
                ylabel="term",
            )
        )
    for kind, title, tags, ylabel in (
        ("fvu", "fraction of variance unexplained", ("val/fvu", "train/fvu"), "FVU"),
        ("l0", "L0: active latents per row", ("val/l0", "train/l0"), "L0"),
    ):
        curves.append(
            line_chart(
                kind,
                f"{title} (solid: {tags[0]}, dashed: {tags[1]})",
                [
                    _curve(r, tag, colors[r.label], DASHES[j], f"{r.label} {tag}")
                    for r in runs
                    for j, tag in enumerate(tags)
                ],
                ylabel=ylabel,
            )
        )
    dead = [
        _curve(r, t, colors[r.label], DASHES[j % len(DASHES)], f"{r.label} {t}")
        for r in runs
        for j, t in enumerate(sorted(t for t in r.scalars if t.startswith("train/dead_fraction")))
    ]
    curves.append(line_chart("dead", "dead fraction (train)", dead, ylabel="fraction"))
    if any("throughput/tokens_per_s" in r.scalars for r in runs):
        curves.append(
            line_chart(
                "throughput",
                "throughput (throughput/tokens_per_s)",
                [
                    _curve(r, "throughput/tokens_per_s", colors[r.label], label=r.label)
                    for r in runs
                ],
                ylabel="tokens / s",
            )
        )
    return '<h2>Curves</h2><div class="grid-plots">' + "".join(curves) + "</div>"


def _sparsity_section(runs: Sequence[RunData], colors: dict[str, str]) -> str:
    several = len(runs) > 1
    pareto = [
        Series(r.label, [(r.metrics["val/l0"], r.metrics["val/fvu"])], colors[r.label])
        for r in runs
        if "val/l0" in r.metrics and "val/fvu" in r.metrics
    ]
    hists = [
        histogram_chart(
            "density",
            f"feature density: {r.label}" if several else "feature density (final validation)",
            r.density,
            "log10 firing frequency (dead latents at -10)",
            colors[r.label],
        )
        for r in runs
    ]
    return (
        "<h2>Sparsity and fidelity</h2>"
        '<p class="note">Each point is a run\'s final validation; lower-left is better. The dashed '
        "line joins the runs no other run beats on both L0 and FVU.</p>"
        '<div class="grid-plots">'
        + scatter_chart("pareto", "L0 vs FVU (final validation)", pareto, "val/l0", "val/fvu")
        + "".join(hists)
        + "</div>"
    )


def _atoms_section(runs: Sequence[RunData]) -> str:
    images = [
        f'<figure><img class="atoms" alt="atoms of {html.escape(r.label)}" '
        f'src="data:image/png;base64,{base64.b64encode(r.atoms_png).decode()}"/>'
        f"<figcaption>{html.escape(r.label)}</figcaption></figure>"
        for r in runs
        if r.atoms_png
    ]
    if not images:
        return ""
    return (
        '<h2>Learned vs true atoms</h2><p class="note">|cosine similarity| between each true '
        "atom (row) and learned atom (column, sorted by best match): a bright staircase is a "
        'recovered dictionary.</p><div class="grid-plots">' + "".join(images) + "</div>"
    )


def _browser_section(runs: Sequence[RunData], base: Path | None) -> str:
    """Links to the feature browsers ``sae-lightning inspect`` wrote into the runs' folders."""
    links = []
    for r in runs:
        index = r.path / INSPECT_INDEX
        if not index.is_file():
            continue
        href = os.path.relpath(index, base) if base is not None else index.resolve().as_uri()
        links.append(
            f'<li><a class="inspect" href="{html.escape(href)}">{html.escape(r.label)}</a></li>'
        )
    if not links:
        return ""
    return (
        '<h2>Feature browser</h2><p class="note">Top-activating contexts, histograms and logit '
        f"effects of every latent (written by <code>sae-lightning inspect</code>).</p>"
        f"<ul>{''.join(links)}</ul>"
    )


def render_report(runs: Sequence[RunData], base: Path | None = None) -> str:
    """The whole ``report.html`` page for ``runs`` (one or more).

    Args:
        runs: the runs to show.
        base: the folder the page is written to, so links to feature browsers are relative
            (absolute ``file://`` links without it).
    """
    colors = {r.label: PALETTE[i % len(PALETTE)] for i, r in enumerate(runs)}
    sections = [
        "<h2>Final metrics</h2>" + _metrics_table(runs),
        _browser_section(runs, base),
        _curves_section(runs, colors),
        _sparsity_section(runs, colors),
        _atoms_section(runs),
    ]
    runs_list = "".join(f"<li><code>{html.escape(str(r.path))}</code></li>" for r in runs)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>sae-lightning report</title>"
        f"<style>{_CSS}</style></head><body>"
        f'<h1>sae-lightning report</h1><p class="note">{len(runs)} run(s), written {stamp}</p>'
        f"<ul>{runs_list}</ul>{''.join(sections)}</body></html>\n"
    )


def write_report(runs: Sequence[RunData], out: str | os.PathLike[str]) -> Path:
    """Write :func:`render_report` to ``out`` atomically and return its path."""
    from sae_lightning.atomic import atomic_write_text

    path = Path(out)
    atomic_write_text(path, render_report(runs, path.resolve().parent))
    return path
