"""The running top-N contexts of every latent, merged chunk by chunk on the device.

Memory is ``O(latents x N x window)`` whatever the number of tokens streamed: each chunk of
contexts contributes its per-context maximum of every latent, and only the best ``N`` (with a
window of tokens and activations around each maximum) are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PAD = -1
"""Token id of window positions outside the context."""


@dataclass
class TopContexts:
    """Per latent, the ``N`` contexts whose maximum activation is largest.

    Attributes:
        values: ``(N, latents)`` the maximum of each kept context, descending; ``-inf`` empty.
        where: ``(N, latents, 2)`` int64 ``(context, position)`` of the maximum.
        tokens: ``(N, latents, W)`` int32 token ids of the window, :data:`PAD` outside.
        acts: ``(N, latents, W)`` the latent's activation at every window position.
        before: window positions before the maximum (``W = before + 1 + after``).
    """

    values: Tensor
    where: Tensor
    tokens: Tensor
    acts: Tensor
    before: int

    @classmethod
    def empty(
        cls,
        n: int,
        latents: int,
        before: int,
        after: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> TopContexts:
        width = before + 1 + after
        return cls(
            values=torch.full((n, latents), -torch.inf, device=device, dtype=dtype),
            where=torch.full((n, latents, 2), -1, device=device, dtype=torch.long),
            tokens=torch.full((n, latents, width), PAD, device=device, dtype=torch.int32),
            acts=torch.zeros(n, latents, width, device=device, dtype=dtype),
            before=before,
        )

    @property
    def width(self) -> int:
        return int(self.tokens.shape[-1])

    def update(self, f: Tensor, ids: Tensor, first_context: int) -> None:
        """Merge a chunk of contexts into the running top-N.

        Args:
            f: ``(B, L, latents)`` activations (zero at positions that are not scored).
            ids: ``(B, L)`` token ids.
            first_context: global index of the chunk's first context.
        """
        b, length, latents = f.shape
        peak, pos = f.max(dim=1)  # (B, latents)
        offsets = torch.arange(-self.before, self.width - self.before, device=f.device)
        window = pos[..., None] + offsets  # (B, latents, W)
        inside = (window >= 0) & (window < length)
        window = window.clamp(0, length - 1)
        acts = f.transpose(1, 2).gather(2, window).masked_fill(~inside, 0)
        tokens = ids.int()[:, None, :].expand(b, latents, length).gather(2, window)
        tokens = tokens.masked_fill(~inside, PAD)
        context = torch.arange(first_context, first_context + b, device=f.device)
        where = torch.stack([context[:, None].expand(b, latents), pos], dim=-1)
        self._merge(peak.to(self.values.dtype), where, tokens, acts.to(self.acts.dtype))

    def _merge(self, peak: Tensor, where: Tensor, tokens: Tensor, acts: Tensor) -> None:
        values = torch.cat([self.values, peak])
        best, index = values.topk(self.values.shape[0], dim=0)  # (N, latents)
        self.values = best
        self.where = _take(torch.cat([self.where, where]), index)
        self.tokens = _take(torch.cat([self.tokens, tokens]), index)
        self.acts = _take(torch.cat([self.acts, acts]), index)

    def latent(self, j: int) -> list[tuple[float, int, int, list[int], list[float]]]:
        """Latent ``j``'s contexts that fire: ``(max, context, position, tokens, acts)``."""
        values = self.values[:, j].tolist()
        where = self.where[:, j].tolist()
        tokens = self.tokens[:, j].tolist()
        acts = self.acts[:, j].tolist()
        return [
            (v, c, p, t, a)
            for v, (c, p), t, a in zip(values, where, tokens, acts, strict=True)
            if v > 0
        ]


def _take(x: Tensor, index: Tensor) -> Tensor:
    """``x[index[i, j], j, ...]`` for ``x`` of shape ``(M, latents, ...)``."""
    shape = (*index.shape, *x.shape[2:])
    expanded = index.reshape(*index.shape, *([1] * (x.ndim - 2))).expand(shape)
    return x.gather(0, expanded)
