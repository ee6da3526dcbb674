"""Per-latent summary statistics over a token stream: firing count, sum, maximum, histogram.

Everything is accumulated chunk by chunk into ``O(latents x bins)`` tensors, so the memory does
not grow with the number of tokens. The histogram bins are fixed in advance (log-spaced over
:data:`DECADES`), so chunks add up exactly and any two runs are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DECADES = (-4, 4)
"""Histogram range: activations from ``10**-4`` to ``10**4`` (outside: the end bins)."""
BINS_PER_DECADE = 8


def histogram_edges() -> Tensor:
    """The float64 bin edges shared by every latent's histogram."""
    lo, hi = DECADES
    return torch.logspace(lo, hi, (hi - lo) * BINS_PER_DECADE + 1, dtype=torch.float64)


def bin_index(values: Tensor, edges: Tensor) -> Tensor:
    """The bin of each positive ``value``: ``i`` with ``edges[i] <= v < edges[i + 1]``,
    clamped to the first and last bins."""
    index = torch.bucketize(values.double(), edges.to(values.device), right=True) - 1
    return index.clamp(0, len(edges) - 2)


@dataclass
class LatentStats:
    """Running statistics of every latent.

    Attributes:
        tokens: tokens seen.
        fires: ``(latents,)`` int64 tokens where the latent is positive.
        total: ``(latents,)`` float64 sum of its activations.
        peak: ``(latents,)`` its largest activation (0 if it never fires).
        hist: ``(latents, bins)`` int64 counts of its positive activations per bin.
    """

    tokens: int
    fires: Tensor
    total: Tensor
    peak: Tensor
    hist: Tensor
    edges: Tensor

    @classmethod
    def empty(cls, latents: int, device: torch.device | str = "cpu") -> LatentStats:
        edges = histogram_edges().to(device)
        return cls(
            tokens=0,
            fires=torch.zeros(latents, dtype=torch.long, device=device),
            total=torch.zeros(latents, dtype=torch.float64, device=device),
            peak=torch.zeros(latents, dtype=torch.float64, device=device),
            hist=torch.zeros(latents, len(edges) - 1, dtype=torch.long, device=device),
            edges=edges,
        )

    def update(self, f: Tensor) -> None:
        """Add ``f``: ``(tokens, latents)`` activations of scored tokens."""
        self.tokens += int(f.shape[0])
        positive = f > 0
        self.fires += positive.sum(dim=0)
        self.total += f.sum(dim=0, dtype=torch.float64)
        if f.shape[0]:
            self.peak = torch.maximum(self.peak, f.amax(dim=0).double())
        row, latent = positive.nonzero(as_tuple=True)
        bins = self.hist.shape[1]
        flat = latent * bins + bin_index(f[row, latent], self.edges)
        self.hist.view(-1).index_add_(0, flat, torch.ones_like(flat))

    @property
    def density(self) -> Tensor:
        """``(latents,)`` fraction of tokens where each latent fires."""
        return self.fires.double() / max(self.tokens, 1)

    @property
    def mean(self) -> Tensor:
        """``(latents,)`` mean activation over all tokens."""
        return self.total / max(self.tokens, 1)

    @property
    def mean_active(self) -> Tensor:
        """``(latents,)`` mean activation over the tokens where it fires (0 if never)."""
        return self.total / self.fires.clamp_min(1).double()
