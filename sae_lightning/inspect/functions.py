"""``inspect`` for a function-space run: each concept's top-activating fields, map overlaid.

A sample's activity of concept ``j`` is the mean ``|z_j(x)|`` of its concept map (or ``|z_j|``
for vector codes). The top-``N`` samples of every concept are kept with their fields and maps
(``O(concepts x N x grid)``), and the pictures are drawn by the neural-operator plugin's
``concept_images`` callback (:meth:`ConceptPages.concept_page`), so the browser shows exactly
what its TensorBoard images show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from rich.console import Console
from torch import Tensor, nn

from sae_lightning.errors import ConfigError
from sae_lightning.inspect.options import InspectOptions
from sae_lightning.inspect.pages import flags, histogram, sig
from sae_lightning.inspect.site import write_browser
from sae_lightning.inspect.stats import LatentStats


@runtime_checkable
class ConceptPages(Protocol):
    """A callback plugin that draws one concept's page (``concept_images`` does)."""

    def concept_page(
        self, sae: nn.Module, fields: Tensor, maps: Tensor, concept: int
    ) -> dict[str, Tensor]: ...


class TopSamples:
    """Per concept, the ``n`` samples of largest activity, with their fields and maps."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.values: Tensor | None = None
        self.fields: Tensor | None = None
        self.maps: Tensor | None = None

    def update(self, activity: Tensor, x: Tensor, codes: Tensor) -> None:
        """``activity (B, p)``, ``x (B, C, *grid)``, ``codes (B, p, *grid)`` or ``(B, p)``."""
        b, p = activity.shape
        fields = x[:, None].expand(b, p, *x.shape[1:])
        if self.values is None or self.fields is None or self.maps is None:
            values, fields_all, maps = activity, fields, codes
        else:
            values = torch.cat([self.values, activity])
            fields_all = torch.cat([self.fields, fields])
            maps = torch.cat([self.maps, codes])
        k = min(self.n, values.shape[0])
        best, index = values.topk(k, dim=0)  # (k, p)
        cols = torch.arange(p, device=values.device)
        self.values = best
        self.fields = fields_all[index, cols]
        self.maps = maps[index, cols]


def activity(codes: Tensor) -> Tensor:
    """``(batch, p)``: ``|z|`` of vector codes, or the mean ``|z_j(x)|`` of concept maps."""
    return codes.abs() if codes.ndim == 2 else codes.abs().flatten(2).mean(dim=2)


def concept_drawer() -> ConceptPages:
    from sae_lightning.registry import registry

    drawer = registry.build("callbacks", {"name": "concept_images"}, field="callbacks")
    if not isinstance(drawer, ConceptPages):
        raise ConfigError("callbacks", "the installed concept_images cannot draw concept pages")
    return drawer


@torch.no_grad()
def scan(sae: nn.Module, dm: Any, options: InspectOptions) -> tuple[LatentStats, TopSamples]:
    """Activity statistics and top samples over up to ``options.tokens`` validation samples."""
    from sae_lightning.module import as_tensor
    from sae_lightning.sae import SparseAutoencoder, channel_view

    scale = sae.input_scale if isinstance(sae, SparseAutoencoder) else None
    device = next(sae.parameters()).device
    dm.setup("validate")
    stats = LatentStats.empty(int(sae.d_sae), device)
    top = TopSamples(options.n_top)
    seen = 0
    for batch in dm.val_dataloader():
        x = as_tensor(batch)[: options.tokens - seen].to(device, options.torch_dtype)
        if x.ndim < 3:
            raise ConfigError("data", "inspect reads language-model or function-space runs")
        if scale is not None:  # the exported SAE takes raw fields: undo `normalize`
            x = x / channel_view(scale, x)
        codes = sae.encode(x)
        act = activity(codes)
        stats.update(act)
        top.update(act, x, codes)
        seen += x.shape[0]
        if seen >= options.tokens:
            break
    return stats, top


def inspect_functions(
    run_dir: Path, sae: nn.Module, dm: Any, options: InspectOptions, console: Console
) -> Path:
    """Write the concept browser of a function-space run; return its ``index.html``."""
    from PIL import Image

    drawer = concept_drawer()
    stats, top = scan(sae, dm, options)
    assert top.values is not None and top.fields is not None and top.maps is not None
    density, peak, mean = stats.density.tolist(), stats.peak.tolist(), stats.mean.tolist()
    flag = flags(stats, options.dense_threshold)
    rows = [[j, sig(density[j]), sig(peak[j]), sig(mean[j]), flag[j], ""] for j in range(len(flag))]
    pictures: dict[str, Tensor] = {}

    def page(j: int) -> dict[str, Any]:
        firing = top.values[:, j] > 0
        drawn = drawer.concept_page(sae, top.fields[firing, j], top.maps[firing, j], j)
        names = []
        for kind, image in drawn.items():
            name = f"images/concept_{j:05d}_{kind}.png"
            pictures[name] = image
            names.append(name)
        return {
            "id": j,
            "flag": flag[j],
            "density": density[j],
            "max": peak[j],
            "mean": mean[j],
            "mean_active": float(stats.mean_active[j]),
            "hist": histogram(stats, j),
            "images": names,
            "images_title": "learned concept; top-activating fields with the activation map "
            "overlaid (1-D: orange; 2-D: green)",
        }

    def save_pictures(stage: Path) -> None:
        (stage / "images").mkdir()
        for name, image in pictures.items():
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(stage / name)

    summary = f"{stats.tokens:,} validation samples; activity = mean |z_j(x)| per sample"
    console.print(summary)
    return write_browser(
        options.out or run_dir / "inspect",
        f"{run_dir.parent.name}/{run_dir.name}",
        summary,
        rows,
        page,
        save_pictures,
    )
