"""Inline SVG charts (lines, scatter with Pareto front, histogram): no plotting library, no
script, so the report renders anywhere."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

from sae_lightning.report.runs import Histogram

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
