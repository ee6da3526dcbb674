"""ReLU with an L1 penalty: the standard SAE (Anthropic, SAELens ``standard``)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from sae_lightning.components.base import (
    Codes,
    Decoder,
    PeerActivation,
    SparsityFn,
    SparsityOutput,
)
from sae_lightning.config import PluginConfig


class ReLUL1Config(PluginConfig):
    l1_coefficient: float = Field(1e-3, ge=0, description="weight of the L1 penalty")
    weight_by_decoder_norm: bool = Field(
        True, description="weight each latent's L1 by its atom's L2 norm (Anthropic 2024)"
    )
    warmup_steps: int = Field(
        0, ge=0, description="ramp the L1 coefficient linearly from 0 over this many steps"
    )


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear ramp from 0 to 1 over ``warmup_steps`` (1 when there is no warm-up)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


class ReLUL1(SparsityFn[ReLUL1Config]):
    """ReLU activations with an L1 penalty, optionally weighted by decoder norms and warmed up."""

    def forward(self, pre_acts: Tensor, *, step: int, decoder: Decoder) -> SparsityOutput:
        acts = torch.relu(pre_acts)  # (batch, d_sae)
        if self.config.weight_by_decoder_norm:
            l1 = (acts * decoder.atom_norms()).sum(dim=1).mean()
        else:
            l1 = acts.sum(dim=1).mean()
        coeff = self.config.l1_coefficient * warmup_factor(step, self.config.warmup_steps)
        return SparsityOutput(Codes(acts, None, self.d_sae), {"l1": coeff * l1})

    def peer_activation(self) -> PeerActivation:
        """SAELens ``standard``: a plain ReLU (the L1 penalty is training-only)."""
        return PeerActivation("relu")
