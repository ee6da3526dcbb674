"""Reading run folders: ``metrics.json`` and the TensorBoard event files.

Curves, the feature-density histogram and the learned-vs-true atom image come from the event
files through tensorboard's ``EventAccumulator``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DENSITY_TAG = "val/feature_density_log10"
ATOMS_TAG = "val/atoms_vs_true_cosine"
EVENTS_GLOB = "events.out.tfevents.*"


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
