"""BatchTopK (Bussmann et al. 2024): the top k x batch activations over the whole batch.

A variable number of latents is active per row while the average L0 is exactly k in training.
At inference the batch dependence is replaced by a global threshold: an exponential moving
average of the smallest selected activation, as SAELens keeps it.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from sae_lightning.components.base import Codes, Decoder, SparsityFn, SparsityOutput
from sae_lightning.components.sparsity.auxk import AuxKConfig, auxk_loss
from sae_lightning.components.sparsity.topk import check_k


class BatchTopKConfig(AuxKConfig):
    k: int = Field(32, gt=0, description="mean active latents per row (k x batch kept per batch)")
    threshold_momentum: float = Field(
        0.01, gt=0, le=1, description="EMA rate of the inference threshold (SAELens: 0.01)"
    )


def batch_topk(acts: Tensor, k: int) -> Tensor:
    """Keep the ``k * batch`` largest entries of ``acts`` (batch, d_sae), zero the rest."""
    flat = acts.reshape(-1)
    n_keep = min(k * acts.shape[0], flat.numel())
    values, indices = flat.topk(n_keep, sorted=False)
    return torch.zeros_like(flat).scatter(0, indices, values).reshape(acts.shape)


class BatchTopK(SparsityFn):
    """BatchTopK: top k x batch ReLU activations per batch; a running threshold at inference."""

    Config = BatchTopKConfig
    config: BatchTopKConfig

    def __init__(self, config: BatchTopKConfig, *, d_in: int, d_sae: int) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae)
        check_k(config.k, d_sae)
        self.k_aux = config.aux_k if config.aux_k is not None else max(d_in // 2, 1)
        # Negative means "not measured yet"; inference then falls back to batch selection.
        self.register_buffer("threshold", torch.tensor(-1.0))

    def forward(self, pre_acts: Tensor, *, step: int, decoder: Decoder) -> SparsityOutput:
        acts = torch.relu(pre_acts)
        if self.training:
            codes = batch_topk(acts, self.config.k)
            self._update_threshold(codes)
        elif bool(self.threshold >= 0):
            codes = acts * (acts > self.threshold)
        else:
            codes = batch_topk(acts, self.config.k)
        return SparsityOutput(Codes(codes, None, self.d_sae), {})

    @torch.no_grad()
    def _update_threshold(self, codes: Tensor) -> None:
        positive = torch.where(codes > 0, codes, torch.full_like(codes, torch.inf))
        smallest = positive.min()
        has_any = torch.isfinite(smallest)
        old = self.threshold
        ema = torch.where(
            old < 0, smallest, old + self.config.threshold_momentum * (smallest - old)
        )
        self.threshold.copy_(torch.where(has_any, ema, old))

    def auxiliary_losses(
        self, pre_acts: Tensor, x: Tensor, residual: Tensor, decoder: Decoder, dead: Tensor
    ) -> dict[str, Tensor]:
        if self.config.aux_coefficient == 0:
            return {}
        aux = auxk_loss(pre_acts, x, residual, decoder, dead, self.k_aux)
        return {"auxk": self.config.aux_coefficient * aux}
