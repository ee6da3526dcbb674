"""One pass over a token stream: encode each chunk with the SAE and update the summaries."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from sae_lightning.inspect.source import Chunk
from sae_lightning.inspect.stats import LatentStats
from sae_lightning.inspect.topk import TopContexts


@dataclass
class Collected:
    """What the browser shows of every latent."""

    stats: LatentStats
    top: TopContexts


@torch.no_grad()
def collect(
    sae: nn.Module,
    chunks: Iterable[Chunk],
    *,
    n_top: int,
    before: int,
    after: int,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int], None] | None = None,
) -> Collected:
    """Encode every chunk with ``sae`` and merge its statistics and top contexts.

    Args:
        sae: the trained SAE (takes raw activations; its device is used).
        chunks: the stream.
        n_top: contexts kept per latent.
        before: window tokens before each maximum.
        after: window tokens after it.
        dtype: the dtype activations are encoded in (float64 for exact references).
        progress: called with the number of tokens of each chunk once it is merged.
    """
    device = next(sae.parameters()).device
    latents = int(sae.d_sae)
    stats = LatentStats.empty(latents, device)
    top = TopContexts.empty(n_top, latents, before, after, device, dtype)
    for chunk in chunks:
        b, length, d_in = chunk.acts.shape
        keep = chunk.keep.to(device)
        x = chunk.acts.to(device, dtype).reshape(b * length, d_in)
        f = sae.encode(x).reshape(b, length, latents)
        f = f * keep[..., None]  # unscored positions neither count nor win
        stats.update(f[keep])
        top.update(f, chunk.ids.to(device), chunk.first)
        if progress is not None:
            progress(int(keep.sum()))
    return Collected(stats, top)
