"""A decoder that reuses the encoder's weight matrix as its dictionary."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from sae_lightning.components.base import Decoder, Encoder, Touched
from sae_lightning.config import PluginConfig
from sae_lightning.errors import ConfigError


class TiedDecoderConfig(PluginConfig):
    normalize: bool = Field(
        True, description="use the encoder rows divided by their L2 norm as unit-norm atoms"
    )


class TiedDecoder(Decoder[TiedDecoderConfig]):
    """Tied weights: atoms are the (row-normalised) encoder rows, W_dec = W_enc^T."""

    def __init__(
        self, config: TiedDecoderConfig, *, d_in: int, d_sae: int, encoder: Encoder
    ) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae, encoder=encoder)
        affine = encoder.affine()
        w = None if affine is None else affine[0]
        if w is None or tuple(w.shape) != (d_sae, d_in):
            raise ConfigError(
                "name",
                f"the 'tied' decoder needs an encoder exposing a ({d_sae}, {d_in}) weight matrix; "
                f"encoder '{type(encoder).__name__}' exposes "
                f"{'none' if w is None else tuple(w.shape)}",
                "use decoder 'linear' with this encoder, or a linear encoder",
            )
        # Hold the encoder without registering it twice as a submodule.
        self._encoder_ref = [encoder]
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def _encoder_weight(self) -> Tensor:
        affine = self._encoder_ref[0].affine()
        assert affine is not None  # checked at construction
        return affine[0]

    def atoms(self) -> Tensor:
        w = self._encoder_weight()
        if self.config.normalize:
            return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return w

    def atom_norms(self) -> Tensor:
        if self.config.normalize:
            return self._encoder_weight().new_ones(self.d_sae)
        return super().atom_norms()

    @torch.no_grad()
    def resample_atoms(self, ids: Tensor, directions: Tensor) -> list[Touched]:
        """Nothing to write: the atoms are the encoder rows that ``resample_rows`` just set.

        With ``normalize`` the new atoms are exactly ``directions``; without it they keep the
        encoder rows' norm.
        """
        return []
