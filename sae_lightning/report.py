"""Run summaries: the terminal metrics tables and a static ``report.html``.

The report reads what a run leaves in its folder: ``metrics.json`` for the final metrics and
the TensorBoard event files (through tensorboard's ``EventAccumulator``) for the curves, the
feature-density histogram and the learned-vs-true atom image. Every plot is an inline SVG drawn
here, so the page needs no server, no script and no network.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

DENSITY_TAG = "val/feature_density_log10"
ATOMS_TAG = "val/atoms_vs_true_cosine"
EVENTS_GLOB = "events.out.tfevents.*"
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


# ---- terminal -------------------------------------------------------------------------------


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


# ---- reading runs ---------------------------------------------------------------------------


@dataclass
class Histogram:
    """A histogram re-binned onto equal-width bins."""

    edges: list[float]
    """``len(counts) + 1`` bin edges."""
    counts: list[float]
    """Number of latents per bin."""
    step: int
    """Training step it was logged at."""


@dataclass
class RunData:
    """What the report shows of one run."""

    path: Path
    label: str
    metrics: dict[str, float]
    """Final metrics: ``metrics.json``, else the last value of every scalar."""
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Every scalar tag's ``(step, value)`` points."""
    density: Histogram | None = None
    """The last feature-density histogram."""
    atoms_png: bytes | None = None
    """The last learned-vs-true atom image, PNG bytes."""


def _is_run(path: Path) -> bool:
    return (path / "metrics.json").is_file() or any(path.glob(EVENTS_GLOB))


def find_runs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Run folders named by ``paths``: each path is a run, or a folder searched for runs.

    Raises:
        FileNotFoundError: a path does not exist, or holds no run.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a folder; pass runs/<name>/version_N")
        if _is_run(path):
            found.append(path)
            continue
        inner = sorted(
            {p.parent for p in path.rglob(EVENTS_GLOB)}
            | {p.parent for p in path.rglob("metrics.json")}
        )
        if not inner:
            raise FileNotFoundError(
                f"{path} holds no run: no metrics.json or TensorBoard event file in it or below"
            )
        found.extend(inner)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


def run_labels(paths: Sequence[Path]) -> list[str]:
    """Short unique labels: the last two path components (``quickstart/version_0``)."""
    labels = ["/".join(p.parts[-2:]) for p in paths]
    if len(set(labels)) < len(labels):
        labels = [str(p) for p in paths]
    return labels


def rebin(
    limits: Sequence[float], counts: Sequence[float], lo: float, hi: float, bins: int = 30
) -> tuple[list[float], list[float]]:
    """Spread TensorBoard's exponential buckets onto ``bins`` equal bins over ``[lo, hi]``.

    Bucket ``i`` covers ``(limits[i-1], limits[i]]``; its count is shared among the bins it
    overlaps in proportion to the overlap (values assumed uniform inside a bucket), so narrow
    and wide buckets both give a smooth histogram. The total count is preserved.

    Returns:
        ``(edges, counts)``.
    """
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    width = (hi - lo) / bins
    out = [0.0] * bins
    prev = -math.inf
    for limit, count in zip(limits, counts, strict=True):
        a, b = min(max(prev, lo), hi), min(max(limit, lo), hi)
        prev = limit
        if not count:
            continue
        if b - a <= 0:  # the bucket lies outside [lo, hi] or is a point: nearest bin
            out[min(max(int((a - lo) / width), 0), bins - 1)] += count
            continue
        first, last = int((a - lo) / width), min(int((b - lo) / width), bins - 1)
        for i in range(first, last + 1):
            overlap = min(b, lo + (i + 1) * width) - max(a, lo + i * width)
            out[i] += count * max(overlap, 0.0) / (b - a)
    return [lo + i * width for i in range(bins + 1)], out


def read_run(path: Path, label: str | None = None) -> RunData:
    """Read one run folder's final metrics and event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {
        tag: [(int(e.step), float(e.value)) for e in acc.Scalars(tag)]
        for tag in tags.get("scalars", [])
        if not tag.startswith("final/")
    }
    metrics_file = path / "metrics.json"
    if metrics_file.is_file():
        metrics = {k: float(v) for k, v in json.loads(metrics_file.read_text()).items()}
    else:
        metrics = {tag: pts[-1][1] for tag, pts in scalars.items() if pts}
    density = None
    if DENSITY_TAG in tags.get("histograms", []):
        event = acc.Histograms(DENSITY_TAG)[-1]
        h = event.histogram_value
        edges, counts = rebin(list(h.bucket_limit), list(h.bucket), float(h.min), float(h.max))
        density = Histogram(edges, counts, int(event.step))
    atoms = None
    if ATOMS_TAG in tags.get("images", []):
        atoms = acc.Images(ATOMS_TAG)[-1].encoded_image_string
    return RunData(path, label or path.name, metrics, scalars, density, atoms)


# ---- SVG plots ------------------------------------------------------------------------------

PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
)
DASHES = ("", "6 3", "2 3", "8 3 2 3")
WIDTH, HEIGHT = 520, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 34, 44


@dataclass
class Series:
    """One line or point set of a chart."""

    label: str
    points: list[tuple[float, float]]
    color: str = PALETTE[0]
    dash: str = ""


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering ``[lo, hi]``."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + 1e-9 * step:
        ticks.append(0.0 if abs(value) < 1e-12 * step else value)
        value += step
    return ticks


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= 10 * div:
            return f"{value / div:.3g}{suffix}"
    if abs(value) < 1e-3:
        return f"{value:.0e}"
    return f"{value:.4g}"


class _Frame:
    """Data-to-pixel mapping of one chart's plotting area."""

    def __init__(self, xs: list[float], ys: list[float], log_y: bool) -> None:
        self.log_y = log_y
        if log_y:
            ys = [math.log10(y) for y in ys]
        self.x0, self.x1 = _padded(min(xs), max(xs), 0.0)
        self.y0, self.y1 = _padded(min(ys), max(ys), 0.05)

    def x(self, value: float) -> float:
        return LEFT + (value - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)

    def y(self, value: float) -> float:
        if self.log_y:
            value = math.log10(value)
        return HEIGHT - BOTTOM - (value - self.y0) / (self.y1 - self.y0) * (HEIGHT - TOP - BOTTOM)


def _padded(lo: float, hi: float, pad: float) -> tuple[float, float]:
    if hi <= lo:
        span = abs(lo) * 0.1 or 1.0
        return lo - span, hi + span
    margin = (hi - lo) * pad
    return lo - margin, hi + margin


def _title(title: str) -> str:
    escaped = html.escape(title)
    return f'<text class="title" x="{WIDTH / 2}" y="20" text-anchor="middle">{escaped}</text>'


def _axes(frame: _Frame, title: str, xlabel: str, ylabel: str) -> list[str]:
    parts = [
        _title(title),
        f'<rect class="area" x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" '
        f'height="{HEIGHT - TOP - BOTTOM}"/>',
    ]
    for tick in nice_ticks(frame.x0, frame.x1):
        px = frame.x(tick)
        parts.append(
            f'<line class="grid" x1="{px:.1f}" y1="{TOP}" x2="{px:.1f}" y2="{HEIGHT - BOTTOM}"/>'
            f'<text class="tick" x="{px:.1f}" y="{HEIGHT - BOTTOM + 14}" '
            f'text-anchor="middle">{_fmt(tick)}</text>'
        )
    if frame.log_y:
        yticks = [10.0**e for e in range(math.floor(frame.y0), math.ceil(frame.y1) + 1)]
        yticks = [t for t in yticks if frame.y0 <= math.log10(t) <= frame.y1]
    else:
        yticks = nice_ticks(frame.y0, frame.y1)
    for tick in yticks:
        py = frame.y(tick)
        parts.append(
            f'<line class="grid" x1="{LEFT}" y1="{py:.1f}" x2="{WIDTH - RIGHT}" y2="{py:.1f}"/>'
            f'<text class="tick" x="{LEFT - 6}" y="{py + 4:.1f}" '
            f'text-anchor="end">{_fmt(tick)}</text>'
        )
    parts.append(
        f'<text class="label" x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 8}" '
        f'text-anchor="middle">{html.escape(xlabel)}</text>'
        f'<text class="label" transform="translate(14 {(TOP + HEIGHT - BOTTOM) / 2}) rotate(-90)" '
        f'text-anchor="middle">{html.escape(ylabel)}</text>'
    )
    return parts


def _legend(series: Sequence[Series], marker: str = "line") -> list[str]:
    parts = []
    for i, s in enumerate(series[:12]):
        y = TOP + 10 + 14 * i
        x = WIDTH - RIGHT - 8
        if marker == "line":
            sym = (
                f'<line x1="{x - 18}" y1="{y - 4}" x2="{x - 2}" y2="{y - 4}" stroke="{s.color}" '
                f'stroke-width="2" stroke-dasharray="{s.dash}"/>'
            )
        else:
            sym = f'<circle cx="{x - 8}" cy="{y - 4}" r="4" fill="{s.color}"/>'
        parts.append(
            f'{sym}<text class="legend" x="{x - 22}" y="{y}" text-anchor="end">'
            f"{html.escape(s.label)}</text>"
        )
    return parts


def _svg(kind: str, title: str, body: list[str]) -> str:
    return (
        f'<svg class="plot" data-plot="{html.escape(kind)}" xmlns="http://www.w3.org/2000/svg" '
        f'width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img">'
        f"<title>{html.escape(title)}</title>{''.join(body)}</svg>"
    )


def _empty(kind: str, title: str, why: str) -> str:
    return _svg(
        kind,
        title,
        [
            _title(title),
            f'<text class="label" x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">'
            f"{html.escape(why)}</text>",
        ],
    )


def line_chart(
    kind: str, title: str, series: Sequence[Series], xlabel: str = "step", ylabel: str = ""
) -> str:
    """An SVG line chart; the y axis is logarithmic when positive values span > 2 decades."""
    series = [s for s in series if s.points]
    if not series:
        return _empty(kind, title, "nothing logged")
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points if math.isfinite(y)]
    if not ys:
        return _empty(kind, title, "no finite values")
    log_y = min(ys) > 0 and max(ys) / min(ys) > 100
    frame = _Frame(xs, ys, log_y)
    body = _axes(frame, title, xlabel, ylabel + (" (log scale)" if log_y else ""))
    for s in series:
        pts = [(x, y) for x, y in s.points if math.isfinite(y) and (y > 0 or not log_y)]
        coords = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in pts)
        body.append(
            f'<polyline class="series" fill="none" stroke="{s.color}" stroke-width="1.8" '
            f'stroke-dasharray="{s.dash}" points="{coords}"><title>{html.escape(s.label)}</title>'
            "</polyline>"
        )
        if len(pts) == 1:
            x, y = pts[0]
            body.append(
                f'<circle cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="3" fill="{s.color}"/>'
            )
    body += _legend(series)
    return _svg(kind, title, body)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (lower L0 and lower FVU), by L0."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def scatter_chart(
    kind: str, title: str, series: Sequence[Series], xlabel: str, ylabel: str, front: bool = True
) -> str:
    """An SVG scatter chart, one labelled point set per series, with the Pareto front drawn."""
    series = [s for s in series if s.points]
    if not series:
        return _empty(kind, title, "no run has both metrics")
    pts = [p for s in series for p in s.points]
    frame = _Frame([x for x, _ in pts], [y for _, y in pts], log_y=False)
    frame.x0, frame.x1 = _padded(min(x for x, _ in pts), max(x for x, _ in pts), 0.08)
    body = _axes(frame, title, xlabel, ylabel)
    if front and len(pts) > 1:
        coords = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in pareto_front(pts))
        body.append(
            f'<polyline class="front" fill="none" stroke="#888" stroke-dasharray="4 3" '
            f'points="{coords}"><title>Pareto front</title></polyline>'
        )
    for s in series:
        for x, y in s.points:
            body.append(
                f'<circle class="point" cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="5" '
                f'fill="{s.color}"><title>{html.escape(s.label)}: {xlabel}={_fmt(x)}, '
                f"{ylabel}={_fmt(y)}</title></circle>"
            )
    body += _legend(series, marker="point")
    return _svg(kind, title, body)


def histogram_chart(kind: str, title: str, hist: Histogram | None, xlabel: str, color: str) -> str:
    """An SVG bar chart of ``hist``."""
    if hist is None or not any(hist.counts):
        return _empty(kind, title, "no histogram logged")
    frame = _Frame([hist.edges[0], hist.edges[-1]], [0.0, max(hist.counts)], log_y=False)
    frame.y0 = 0.0
    body = _axes(frame, title, xlabel, "latents")
    for lo, hi, count in zip(hist.edges, hist.edges[1:], hist.counts, strict=False):
        if count <= 0:
            continue
        x, y = frame.x(lo), frame.y(count)
        body.append(
            f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{max(frame.x(hi) - x - 1, 1):.1f}" '
            f'height="{frame.y(0) - y:.1f}" fill="{color}"><title>[{_fmt(lo)}, {_fmt(hi)}): '
            f"{int(count)}</title></rect>"
        )
    return _svg(kind, title, body)


# ---- the page -------------------------------------------------------------------------------

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


def render_report(runs: Sequence[RunData]) -> str:
    """The whole ``report.html`` page for ``runs`` (one or more)."""
    colors = {r.label: PALETTE[i % len(PALETTE)] for i, r in enumerate(runs)}
    several = len(runs) > 1
    sections: list[str] = []

    sections.append("<h2>Final metrics</h2>" + _metrics_table(runs))

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
    sections.append('<h2>Curves</h2><div class="grid-plots">' + "".join(curves) + "</div>")

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
    sections.append(
        "<h2>Sparsity and fidelity</h2>"
        '<p class="note">Each point is a run\'s final validation; lower-left is better. The dashed '
        "line joins the runs no other run beats on both L0 and FVU.</p>"
        '<div class="grid-plots">'
        + scatter_chart("pareto", "L0 vs FVU (final validation)", pareto, "val/l0", "val/fvu")
        + "".join(hists)
        + "</div>"
    )

    images = [
        f'<figure><img class="atoms" alt="atoms of {html.escape(r.label)}" '
        f'src="data:image/png;base64,{base64.b64encode(r.atoms_png).decode()}"/>'
        f"<figcaption>{html.escape(r.label)}</figcaption></figure>"
        for r in runs
        if r.atoms_png
    ]
    if images:
        sections.append(
            '<h2>Learned vs true atoms</h2><p class="note">|cosine similarity| between each true '
            "atom (row) and learned atom (column, sorted by best match): a bright staircase is a "
            'recovered dictionary.</p><div class="grid-plots">' + "".join(images) + "</div>"
        )

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
    atomic_write_text(path, render_report(runs))
    return path
