"""AuxK (Gao et al. 2024): dead latents learn to reconstruct what the live ones miss.

Shared by the TopK family. The top ``k_aux`` pre-activations among dead latents decode the
residual ``e = x - x_hat`` (no bias: the residual already excludes it). The term is normalised by
the batch's total variance and scaled by ``min(n_dead / k_aux, 1)`` as sparsify and SAELens do.
Nothing here synchronises with the host: with no dead latent the term is exactly zero.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from sae_lightning.components.base import Codes, Decoder
from sae_lightning.config import PluginConfig


class AuxKConfig(PluginConfig):
    """Parameters shared by the TopK family for the AuxK dead-latent loss."""

    aux_k: int | None = Field(
        None, gt=0, description="dead latents used by AuxK; default d_in // 2 (sparsify, SAELens)"
    )
    aux_coefficient: float = Field(
        1 / 32, ge=0, description="weight of the AuxK term (OpenAI: 1/32); 0 disables it"
    )


def auxk_loss(
    pre_acts: Tensor, x: Tensor, residual: Tensor, decoder: Decoder, dead: Tensor, k_aux: int
) -> Tensor:
    """``min(n_dead/k_aux, 1) * ||e - e_hat||^2 / ||x - mean(x)||^2`` over the batch.

    Args:
        pre_acts: ``(batch, d_sae)`` encoder output.
        x: ``(batch, d_in)`` inputs, for the variance normaliser.
        residual: ``(batch, d_in)`` ``x - x_hat`` with ``x_hat`` detached.
        decoder: decodes the auxiliary codes.
        dead: ``(d_sae,)`` bool mask of dead latents.
        k_aux: number of auxiliary latents per row (at most ``d_sae``).
    """
    k_aux = min(k_aux, pre_acts.shape[1])
    masked = torch.where(dead.unsqueeze(0), pre_acts, torch.full_like(pre_acts, -torch.inf))
    values, indices = masked.topk(k_aux, dim=1, sorted=False)  # (batch, k_aux)
    values = torch.where(torch.isfinite(values), values, torch.zeros_like(values))
    e_hat = decoder.decode_without_bias(Codes(values, indices, pre_acts.shape[1]))
    n_dead = dead.sum().to(pre_acts.dtype)
    scale = (n_dead / k_aux).clamp(max=1.0)
    total_variance = (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
    return scale * (e_hat - residual.detach()).pow(2).sum() / total_variance
