"""Pieces the expander benchmarks share: a step timer callback, batches generated before the
fit, one bare training step, and the frame of the frontier benchmarks (their common options,
the doc section they rewrite)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


class StepTimer(pl.Callback):
    """Wall time of every training step, from batch start to batch end (after the optimizer)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, out: Any, batch: Any, i: int
    ) -> None:
        self.times.append(time.perf_counter() - self._start)


def generate_before_fit(datamodule: Any, batches: int) -> None:
    """Make the synthetic data module's first ``batches`` batches now, so that its prefetch
    thread only hands them over while steps are timed: on a 2-core machine, generating a
    (4096, 768) batch (about 46 ms of one core) alongside a step slows the step itself."""
    make = datamodule.rank_batch
    made = {t: make(t) for t in range(batches)}
    datamodule.rank_batch = lambda t: made[t] if t in made else make(t)


def train_step(sae: Any, x: torch.Tensor, opt: torch.optim.Optimizer, dead: torch.Tensor) -> None:
    """One step as the module trains: MSE + AuxK, backward, the decoder's constraints, Adam.

    Nothing outlives the step, as when ``training_step`` returns.
    """
    out = sae.run(x)
    residual = x - out.x_hat.detach()
    aux = sae.auxiliary_losses(out.aux_source, x, residual, dead)
    loss = (x - out.x_hat).pow(2).sum(dim=1).mean() + sum(aux.values())
    loss.backward()
    sae.before_optimizer_step()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sae.after_optimizer_step()


def replace_between(doc: Path, begin: str, end: str, lines: list[str]) -> None:
    """Replace what lies between the markers ``begin`` and ``end`` of ``doc`` (kept)."""
    text = doc.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{doc}: add the markers {begin} and {end} where the table goes")
    head, rest = text.split(begin, 1)
    doc.write_text(head + "\n".join([begin, "", *lines, "", end]) + rest.split(end, 1)[1])


def frontier_parser(description: str, *, threads: int) -> argparse.ArgumentParser:
    """The options every frontier benchmark takes; each adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=None, help="override trainer.max_steps")
    parser.add_argument("--threads", type=int, default=threads, help="torch threads")
    parser.add_argument("--no-write", action="store_true", help="print only; leave the doc")
    parser.add_argument(
        "--only", nargs="+", default=None, help="train only variants whose label contains one"
    )
    parser.add_argument("--output-dir", default=None, help="run folders (default: a temp dir)")
    return parser


def write_frontier(doc: Path, markers: tuple[str, str], header: str, table: str, svg: str) -> None:
    """Rewrite a frontier section of ``doc``: how it was made, the table, the chart."""
    replace_between(doc, *markers, [header, "", table, "", svg])


def label_of(row: dict) -> str:
    """The x-axis label of a frontier row: ``d=<degree>`` for an expander, else ``dense``."""
    return row["label"].split()[-1] if row["label"].startswith("expander") else "dense"


def svg_frame(
    size: tuple[int, int, int, int, int, int],
    y_ticks: list[tuple[float, float]],
    x_labels: list[tuple[float, str]],
    x_title: str,
    y_title: str,
) -> list[str]:
    """The opening of a hand-drawn SVG plot: background, axes, tick labels and titles.

    Args:
        size: ``(width, height, left, right, top, bottom)`` in pixels.
        y_ticks: ``(pixel y, value)`` per tick; x_labels: ``(pixel x, text)`` per point.
    """
    w, h, left, right, top, bottom = size
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>',
    ]
    for y, v in y_ticks:
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for x, name in x_labels:
        out.append(f'<text x="{x:.1f}" y="{h - bottom + 14}" text-anchor="middle">{name}</text>')
    out.append(
        f'<text x="{(left + w - right) / 2}" y="{h - 12}" text-anchor="middle">{x_title}</text>'
    )
    out.append(
        f'<text x="14" y="{(top + h - bottom) / 2}" transform="rotate(-90 14 '
        f'{(top + h - bottom) / 2})" text-anchor="middle">{y_title}</text>'
    )
    return out
