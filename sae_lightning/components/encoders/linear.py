"""The standard affine encoder ``W_enc (x - b_dec) + b_enc``."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from sae_lightning.components.base import Encoder, Touched
from sae_lightning.config import PluginConfig


class LinearEncoderConfig(PluginConfig):
    center_input: bool = Field(
        True, description="subtract the decoder bias b_dec from inputs before encoding"
    )
    init_scale: float = Field(
        1.0, gt=0, description="initial L2 norm of each encoder row (rows start unit-norm x this)"
    )


class LinearEncoder(Encoder[LinearEncoderConfig]):
    """Affine encoder W_enc x + b_enc, optionally centring inputs by the decoder bias."""

    def __init__(self, config: LinearEncoderConfig, *, d_in: int, d_sae: int) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae)
        self.center_input = config.center_input
        w = torch.randn(d_sae, d_in)
        w = w / w.norm(dim=1, keepdim=True) * config.init_scale
        self.W_enc = nn.Parameter(w)  # (d_sae, d_in)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))

    def forward(self, x: Tensor) -> Tensor:
        # (batch, d_in) @ (d_in, d_sae) -> (batch, d_sae)
        return torch.addmm(self.b_enc, x, self.W_enc.t())

    def affine(self) -> tuple[Tensor, Tensor]:
        return self.W_enc, self.b_enc

    @torch.no_grad()
    def resample_rows(self, ids: Tensor, directions: Tensor, norm: Tensor) -> list[Touched]:
        self.W_enc[ids] = directions.to(self.W_enc.dtype) * norm
        self.b_enc[ids] = 0.0
        return [Touched(self.W_enc, ids), Touched(self.b_enc, ids)]
