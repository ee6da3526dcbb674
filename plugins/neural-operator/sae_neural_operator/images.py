"""TensorBoard pictures of a function-space SAE: its concept functions and their activation maps.

Two images per validation (rank 0, TensorBoard loggers only):

- ``val/concepts``: one row per shown concept. With known true concepts (``true_concepts(grid)``
  on the data module) the row is ``[true atom | matched learned concept]``, rows in the order of
  the true atoms and learned concepts matched to them by the Hungarian assignment on |cosine|
  (shift-aware, and the learned kernel rolled to its best shift, for convolutional decoders).
  Without them the rows are the learned concepts most active on the shown samples.
- ``val/concept_activations``: one row per validation sample: ``[input | reconstruction |
  activation maps of the sample's most active concepts]`` (input and reconstruction on one
  scale; for 1-D data overlaid in one panel, input blue, reconstruction orange); for
  vector codes (one scalar per concept) the last panel plots the code vector against the
  concept index.

1-D functions are drawn as line plots (white background; channels in different colours; a grey
zero line), 2-D functions as heatmaps (red positive, blue negative, white zero, symmetric scale
per panel). Everything is drawn with torch, so no plotting library is needed.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor
from typing_extensions import override

from sae_lightning.callbacks.batch_end import BatchEndCallback
from sae_lightning.callbacks.schedule import EveryNValidations, ScheduledCallback
from sae_lightning.callbacks.tensorboard import tensorboard_loggers
from sae_lightning.config import PluginConfig
from sae_lightning.module import as_tensor
from sae_neural_operator.recovery import best_shift, functional_mmcs

CONCEPTS_TAG = "val/concepts"
ACTIVATIONS_TAG = "val/concept_activations"

COLOURS = torch.tensor(
    [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189]],
    dtype=torch.uint8,
)
"""Line colours of successive channels (RGB)."""
BACKGROUND, ZERO_LINE, FRAME = 255, 200, 128


class ConceptImagesConfig(PluginConfig):
    max_concepts: int = Field(8, gt=0, description="concepts shown in val/concepts")
    n_samples: int = Field(3, ge=0, description="validation samples shown with their maps")
    maps_per_sample: int = Field(4, gt=0, description="activation maps shown per sample")
    max_channels: int = Field(
        2, gt=0, description="channels drawn per function (the first ones); 2-D shows channel 0"
    )
    panel_size: int = Field(96, ge=16, le=1024, description="pixels per panel side")
    every_n_validations: int = Field(
        1, gt=0, description="draw at every n-th validation during fit (always in `validate`)"
    )


# ---- drawing --------------------------------------------------------------------------------


def line_plot(curves: Tensor, height: int, width: int) -> Tensor:
    """``(L, N)`` curves on a periodic grid -> ``(3, height, width)`` uint8 line plot.

    Curves share one vertical scale (their joint min..max, with a 5% margin); curve ``l`` takes
    colour ``COLOURS[l % 5]``; a grey line marks zero when it is in range.
    """
    curves = curves.detach().double().cpu()
    if curves.ndim == 1:
        curves = curves[None]
    lo, hi = float(curves.min()), float(curves.max())
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    lo, hi = lo - 0.05 * span, hi + 0.05 * span
    x = F.interpolate(curves[None], size=width, mode="linear", align_corners=True)[0]  # (L, W)
    y = (hi - x) / (hi - lo) * (height - 1)  # row of each column's value, 0 at the top
    image = torch.full((3, height, width), BACKGROUND, dtype=torch.uint8)
    rows = torch.arange(height, dtype=torch.float64)[:, None]  # (H, 1)
    if lo < 0 < hi:
        image[:, round((hi - 0) / (hi - lo) * (height - 1)), :] = ZERO_LINE
    y_next = torch.cat([y[:, 1:], y[:, -1:]], dim=1)
    for i in range(y.shape[0]):
        top = torch.minimum(y[i], y_next[i]).round()
        bottom = torch.maximum(y[i], y_next[i]).round()
        on = (rows >= top) & (rows <= bottom)  # (H, W): the segment to the next column
        image[:, on] = COLOURS[i % len(COLOURS)][:, None]
    return image


def heatmap(field: Tensor, size: int, scale: float | None = None) -> Tensor:
    """``(H, W)`` field -> ``(3, size, size)`` uint8, red positive, blue negative, white zero.

    Values are divided by ``scale`` (default ``max |field|``) and clipped to [-1, 1]; pixels
    are repeated (nearest neighbour).
    """
    f = field.detach().double().cpu()
    s = float(f.abs().max()) if scale is None else scale
    t = (f / max(s, 1e-12)).clamp(-1, 1)
    pos, neg = t.clamp_min(0), (-t).clamp_min(0)
    rgb = torch.stack([1 - neg, 1 - pos - neg, 1 - pos])  # (3, H, W) in [0, 1]
    rgb = F.interpolate(rgb[None], size=(size, size), mode="nearest")[0]
    return (rgb * 255).round().to(torch.uint8)


def draw_function(u: Tensor, size: int, max_channels: int) -> Tensor:
    """One function ``(C, N)`` or ``(C, H, W)`` (or a vector ``(n,)``) as a ``(3, s, s)`` panel."""
    if u.ndim == 1:
        return line_plot(u[None], size, size)
    if u.ndim == 2:
        return line_plot(u[:max_channels], size, size)
    return heatmap(u[0], size)


def with_map(u: Tensor, z: Tensor, size: int) -> Tensor:
    """A field ``(C, *grid)`` with a concept's activation map ``z`` (``grid``) overlaid.

    1-D: channel 0 (blue) and the map scaled to the field's amplitude (orange) in one panel.
    2-D: the heatmap of channel 0, tinted green where the map is large.
    """
    if u.ndim == 2:
        amplitude = float(u[0].abs().max()) / max(float(z.abs().max()), 1e-12)
        return line_plot(torch.stack([u[0], z * amplitude]), size, size)
    panel = heatmap(u[0], size).double()
    strength = F.interpolate(z.abs().double()[None, None], size=(size, size), mode="nearest")[0]
    alpha = 0.6 * strength / max(float(strength.max()), 1e-12)
    green = torch.tensor([44.0, 160.0, 44.0], dtype=torch.float64)[:, None, None]
    return (panel * (1 - alpha) + green * alpha).round().to(torch.uint8)


def input_and_reconstruction(u: Tensor, u_hat: Tensor, size: int) -> list[Tensor]:
    """Channel 0 of a sample and its reconstruction on one scale, so amplitudes compare.

    1-D: one panel, input (blue) and reconstruction (orange) overlaid. 2-D: two heatmaps
    sharing the input's scale.
    """
    if u.ndim == 2:
        return [line_plot(torch.stack([u[0], u_hat[0]]), size, size)]
    scale = float(u[0].abs().max())
    return [heatmap(u[0], size, scale), heatmap(u_hat[0], size, scale)]


def tile(rows: list[list[Tensor]], pad: int = 2) -> Tensor:
    """Panels ``(3, h, w)`` (equal sizes) laid out row by row on a grey frame -> ``(3, H, W)``."""
    h, w = rows[0][0].shape[1:]
    n_cols = max(len(r) for r in rows)
    out = torch.full(
        (3, pad + len(rows) * (h + pad), pad + n_cols * (w + pad)), FRAME, dtype=torch.uint8
    )
    for i, row in enumerate(rows):
        for j, panel in enumerate(row):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            out[:, top : top + h, left : left + w] = panel
    return out


# ---- choosing what to show ------------------------------------------------------------------


def aligned(true: Tensor, learned: Tensor, shift_aware: bool) -> Tensor:
    """``learned`` rolled to its best circular shift against ``true`` (when ``shift_aware``)
    and sign-flipped so the two correlate positively, for drawing side by side.

    Args:
        true: ``(C, *grid)``.
        learned: ``(C, *grid)``, the same grid.
    """
    t, w = true.double(), learned.double()
    if shift_aware:
        w = torch.roll(w, best_shift(t, w), dims=tuple(range(1, t.ndim)))
    if float((t * w).sum()) < 0:
        w = -w
    return w.to(learned.dtype)


def matched_pairs(true: Tensor, learned: Tensor, shift_aware: bool) -> list[tuple[Tensor, Tensor]]:
    """``[(true_i, its matched learned concept, aligned)]`` in the true atoms' order.

    The matching is :func:`~sae_neural_operator.recovery.functional_mmcs`'s (Hungarian on
    |cos|, shift-aware for convolutional decoders), the one behind the logged MMCS.
    """
    assignment = functional_mmcs(true.double(), learned.double(), shift_aware).assignment
    return [
        (true[i], aligned(true[i], learned[j], shift_aware))
        for i, j in enumerate(assignment.tolist())
        if j >= 0
    ]


def activity(codes: Tensor) -> Tensor:
    """``(batch, p)`` size of each concept's activation: |z| (vector codes) or mean |z_j(x)|."""
    return codes.abs() if codes.ndim == 2 else codes.abs().flatten(2).mean(dim=2)


# ---- the callback ---------------------------------------------------------------------------


class ConceptImages(ScheduledCallback, BatchEndCallback):
    """TensorBoard images of learned concept functions and activation maps (see module doc).

    Args:
        config: validated :class:`ConceptImagesConfig`.
    """

    Config = ConceptImagesConfig

    def __init__(self, config: ConceptImagesConfig) -> None:
        self.config = config
        self.schedule = EveryNValidations(config.every_n_validations, rank_zero_only=True)
        self.samples: Tensor | None = None

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.samples = None

    @override
    def after_validation_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, dataloader_idx: int
    ) -> None:
        if self.samples is None and dataloader_idx == 0:
            x = as_tensor(batch)
            if x.ndim > 2:  # function batches only
                self.samples = x[: max(self.config.n_samples, 1)].detach()

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = tensorboard_loggers(trainer)
        if not loggers or self.samples is None or not self.schedule.due(trainer):
            return
        images = self.render(pl_module.sae, trainer.datamodule, self.samples)
        for logger in loggers:
            for tag, image in images.items():
                logger.experiment.add_image(tag, image, trainer.global_step, dataformats="CHW")

    @torch.no_grad()
    def concept_page(
        self, sae: torch.nn.Module, fields: Tensor, maps: Tensor, concept: int
    ) -> dict[str, Tensor]:
        """Pictures of one concept for ``sae-lightning inspect``, ``(3, H, W)`` uint8 each.

        ``concept``: the learned concept function (when the decoder has one); ``fields``: each
        of ``fields`` (``(n, C, *grid)``, the concept's top-activating inputs) with the
        concept's activation map (``maps``, ``(n, *grid)``) overlaid, one panel per field.
        """
        c = self.config
        images: dict[str, Tensor] = {}
        concept_fn = getattr(sae.decoder, "concept_functions", None)
        if callable(concept_fn) and fields.ndim > 2:
            learned = concept_fn(tuple(fields.shape[2:])).detach().cpu()
            images["concept"] = tile(
                [[draw_function(learned[concept], c.panel_size, c.max_channels)]]
            )
        panels = [
            with_map(u.cpu(), z.cpu(), c.panel_size)
            if z.ndim
            else draw_function(u.cpu(), c.panel_size, c.max_channels)
            for u, z in zip(fields, maps, strict=True)
        ]
        if panels:
            images["fields"] = tile([panels[i : i + 5] for i in range(0, len(panels), 5)])
        return images

    @torch.no_grad()
    def render(self, sae: torch.nn.Module, datamodule: Any, samples: Tensor) -> dict[str, Tensor]:
        """``{tag: (3, H, W) uint8}`` for ``samples`` (a function batch on the training grid)."""
        c = self.config
        size = c.panel_size
        grid = tuple(samples.shape[2:])
        out = sae.run(samples)
        codes = out.codes.dense()  # (B, p) or (B, p, *grid)
        usage = activity(codes).sum(dim=0)  # (p,)
        images: dict[str, Tensor] = {}

        concept_fn = getattr(sae.decoder, "concept_functions", None)
        learned = concept_fn(grid).detach().cpu() if callable(concept_fn) else None
        true_fn = getattr(datamodule, "true_concepts", None)
        true = true_fn(grid).detach().cpu() if callable(true_fn) else None
        if learned is not None:
            if true is not None:
                shift_aware = bool(getattr(sae.decoder, "convolutional", False))
                # the full matching (the logged MMCS's), then its first max_concepts pairs
                pairs = matched_pairs(true, learned, shift_aware)[: c.max_concepts]
                rows = [
                    [draw_function(t, size, c.max_channels), draw_function(w, size, c.max_channels)]
                    for t, w in pairs
                ]
            else:
                top = torch.argsort(usage.cpu(), descending=True)[: c.max_concepts]
                rows = [[draw_function(learned[j], size, c.max_channels)] for j in top.tolist()]
            if rows:
                images[CONCEPTS_TAG] = tile(rows)

        rows = []
        for b in range(min(c.n_samples, samples.shape[0])):
            row = input_and_reconstruction(samples[b].cpu(), out.x_hat[b].cpu(), size)
            z = codes[b].cpu()
            if z.ndim == 1:
                row.append(line_plot(z[None], size, size))
            else:
                size_of = activity(z[None])[0]
                strongest = torch.argsort(size_of, descending=True)[: c.maps_per_sample]
                for j in strongest[size_of[strongest] > 0].tolist():  # inactive maps: not drawn
                    row.append(draw_function(z[j : j + 1], size, 1))
            rows.append(row)
        if rows:
            images[ACTIVATIONS_TAG] = tile(rows)
        return images
