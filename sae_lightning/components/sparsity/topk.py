"""TopK (Gao et al. 2024): keep the k largest pre-activations per row, ReLU them."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from sae_lightning.components.base import Codes, Decoder, SparsityFn, SparsityOutput
from sae_lightning.components.sparsity.auxk import AuxKConfig, auxk_loss
from sae_lightning.errors import ConfigError


class TopKConfig(AuxKConfig):
    k: int = Field(32, gt=0, description="active latents per row")


def check_k(k: int, d_sae: int, field: str = "k") -> None:
    """Reject ``k`` that no dictionary of ``d_sae`` latents can satisfy."""
    if k > d_sae:
        raise ConfigError(
            field,
            f"k={k} is larger than the dictionary (d_sae={d_sae})",
            "choose k <= d_sae, or enlarge the dictionary with model.d_sae / expansion_factor",
        )


class TopK(SparsityFn):
    """TopK: the k largest pre-activations per row, ReLU'd; sparse codes; AuxK for dead latents."""

    Config = TopKConfig
    config: TopKConfig

    def __init__(self, config: TopKConfig, *, d_in: int, d_sae: int) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae)
        check_k(config.k, d_sae)
        self.k_aux = config.aux_k if config.aux_k is not None else max(d_in // 2, 1)

    def forward(self, pre_acts: Tensor, *, step: int, decoder: Decoder) -> SparsityOutput:
        values, indices = pre_acts.topk(self.config.k, dim=1, sorted=False)  # (batch, k)
        return SparsityOutput(Codes(torch.relu(values), indices, self.d_sae), {})

    def auxiliary_losses(
        self, pre_acts: Tensor, x: Tensor, residual: Tensor, decoder: Decoder, dead: Tensor
    ) -> dict[str, Tensor]:
        if self.config.aux_coefficient == 0:
            return {}
        aux = auxk_loss(pre_acts, x, residual, decoder, dead, self.k_aux)
        return {"auxk": self.config.aux_coefficient * aux}
