"""A dense dictionary with unit-norm atoms, kept unit-norm after every optimizer step."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from sae_lightning.components.base import Decoder, Encoder, Touched
from sae_lightning.config import PluginConfig


class LinearDecoderConfig(PluginConfig):
    unit_norm: bool = Field(
        True, description="renormalise every atom (row of W_dec) to unit L2 norm after each step"
    )
    project_gradients: bool = Field(
        True,
        description="remove the gradient component parallel to each atom before the step "
        "(as OpenAI/Anthropic/SAELens do); only with unit_norm",
    )
    init_from_encoder: bool = Field(
        True, description="start from the transposed encoder (W_dec = W_enc^T, row-normalised)"
    )


class LinearDecoder(Decoder[LinearDecoderConfig]):
    """Dense dictionary W_dec with unit-norm atoms and radial-gradient projection."""

    def __init__(
        self, config: LinearDecoderConfig, *, d_in: int, d_sae: int, encoder: Encoder
    ) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae, encoder=encoder)
        affine = encoder.affine()
        if config.init_from_encoder and affine is not None and affine[0].shape == (d_sae, d_in):
            w = affine[0].detach().clone()
        else:
            w = torch.randn(d_sae, d_in)
        w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec = nn.Parameter(w)  # (d_sae, d_in): one atom per row
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def atoms(self) -> Tensor:
        return self.W_dec

    def atom_norms(self) -> Tensor:
        if self.config.unit_norm:
            return self.W_dec.new_ones(self.d_sae)
        return self.W_dec.norm(dim=1)

    @torch.no_grad()
    def resample_atoms(self, ids: Tensor, directions: Tensor) -> list[Touched]:
        self.W_dec[ids] = directions.to(self.W_dec.dtype)
        return [Touched(self.W_dec, ids)]

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        grad = self.W_dec.grad
        if grad is None or not (self.config.unit_norm and self.config.project_gradients):
            return
        # Atoms are unit-norm, so the radial part of each row's gradient is (g . w) w.
        radial = torch.linalg.vecdot(grad, self.W_dec, dim=1).unsqueeze(1)  # (d_sae, 1)
        grad.addcmul_(radial, self.W_dec, value=-1)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.config.unit_norm:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
