"""Unit-direction atoms with a learned gain each: the template for a decoder plugin.

``atoms()`` is the whole contract: the base class decodes ``codes @ atoms() + b_dec`` (gathering
only the active rows of sparse codes) and reads atom norms from it. The directions are
renormalised after every optimizer step (``after_optimizer_step``), so the gain alone carries
each atom's scale.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from sae_lightning.components.base import Decoder, Encoder, Touched
from sae_lightning.config import PluginConfig


class ScaledDecoderConfig(PluginConfig):
    init_gain: float = Field(1.0, gt=0, description="initial gain of every atom")


class ScaledDecoder(Decoder[ScaledDecoderConfig]):
    """Atoms g_j * v_j: a unit direction v_j and a learned gain g_j > 0 per latent."""

    def __init__(
        self, config: ScaledDecoderConfig, *, d_in: int, d_sae: int, encoder: Encoder
    ) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae, encoder=encoder)
        v = torch.randn(d_sae, d_in)
        self.directions = nn.Parameter(v / v.norm(dim=1, keepdim=True))  # (d_sae, d_in)
        self.log_gain = nn.Parameter(torch.full((d_sae,), float(config.init_gain)).log())
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def atoms(self) -> Tensor:
        return self.directions * self.log_gain.exp()[:, None]  # (d_sae, d_in)

    def atom_norms(self) -> Tensor:
        return self.log_gain.exp()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.directions /= self.directions.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def resample_atoms(self, ids: Tensor, directions: Tensor) -> list[Touched]:
        self.directions[ids] = directions.to(self.directions.dtype)
        self.log_gain[ids] = 0.0  # gain 1: the new atom is exactly the unit direction
        return [Touched(self.directions, ids), Touched(self.log_gain, ids)]
