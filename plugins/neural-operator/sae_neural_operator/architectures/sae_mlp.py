"""SAE-MLP: the standard affine SAE on the flattened training grid (vector codes, one grid)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from sae_lightning.components.base import Codes, Decoder, Encoder
from sae_lightning.config import PluginConfig
from sae_neural_operator.architectures.common import (
    FlatFunctionDecoder,
    FlatFunctionEncoder,
    FunctionDecoderConfig,
    Grid,
    scale_rows_,
    unit_functions,
)


class MLPFunctionEncoderConfig(PluginConfig):
    grid: Grid = Field(
        description="the fixed grid the SAE is trained at, e.g. [64] or [32, 32]; the flattened "
        "model runs only there"
    )


class MLPFunctionEncoder(FlatFunctionEncoder[MLPFunctionEncoderConfig]):
    """SAE-MLP encoder: z_j = <e_j, u> + b_j on the flattened grid (vector codes, one grid).

    ``pre_j = w sum_{c,n} e_j[c, n] u[c, n] + b_enc[j]``: the standard affine SAE encoder on
    ``vec(u)`` in ``R^{C |N|}`` with the quadrature weight folded in, so that ``e_j`` is an
    encoder *function* of O(1) values and ``pre_j`` the L2 inner product ``<e_j, u>``. Rows
    ``W_enc`` ``(p, C |N|)`` start as random functions of unit L2 norm.
    """

    kind = "sae_mlp"

    def __init__(self, config: MLPFunctionEncoderConfig, *, d_in: int, d_sae: int) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae)
        self.W_enc = nn.Parameter(unit_functions(d_sae, self.grid, d_in))  # (p, C |N|)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))


class MLPFunctionDecoderConfig(FunctionDecoderConfig):
    grid: Grid | None = Field(
        None,
        description="the training grid the flattened atoms live on, e.g. [64]; default: the "
        "encoder's grid",
    )


class MLPFunctionDecoder(FlatFunctionDecoder[MLPFunctionDecoderConfig]):
    """SAE-MLP decoder: u_hat = sum_j z_j d_j + b_dec with d_j stored on the training grid.

    ``W_dec`` ``(p, C |N|)`` holds ``vec(d_j)`` per row; the output is reshaped to
    ``(B, C, *grid)``. Sparse TopK codes decode by gathering ``k`` rows.
    """

    kind = "sae_mlp"

    def __init__(
        self, config: MLPFunctionDecoderConfig, *, d_in: int, d_sae: int, encoder: Encoder
    ) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae, encoder=encoder)
        shape = (d_sae, self.flat_dim)
        w_enc = getattr(encoder, "W_enc", None)
        if config.init_from_encoder and isinstance(w_enc, Tensor) and w_enc.shape == shape:
            w = w_enc.detach().clone()
        else:
            w = torch.randn(shape)
        self.W_dec = nn.Parameter(w)  # (p, C |N|): vec(d_j) per row
        self._normalise()

    def atoms(self) -> Tensor:
        return self.W_dec

    def _decode_flat(self, codes: Codes) -> Tensor:
        return Decoder.decode_without_bias(self, codes)  # dense, or gathers k rows

    def _scale_atoms_(self, scale: Tensor) -> None:
        scale_rows_(self.W_dec, scale)
