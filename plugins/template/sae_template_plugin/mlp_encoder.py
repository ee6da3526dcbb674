"""A two-layer encoder: the template for an encoder plugin that is not a plain affine map.

``pre_acts = W_2 relu(W_1 x + b_1) + b_2``. Because the map is not ``x @ W.T + b``,
:meth:`weight` returns None: the core then uses the dense path, a ``tied`` decoder is refused
with an error naming this encoder, the SAELens / sparsify exports refuse the SAE, and the
``resampler`` callback reports that ``resample_rows`` is missing.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from sae_lightning.components.base import Encoder
from sae_lightning.config import PluginConfig


class MLPEncoderConfig(PluginConfig):
    hidden: int = Field(64, gt=0, description="width of the hidden layer")


class MLPEncoder(Encoder[MLPEncoderConfig]):
    """Two-layer encoder W_2 relu(W_1 x + b_1) + b_2 (not affine: weight() is None)."""

    def __init__(self, config: MLPEncoderConfig, *, d_in: int, d_sae: int) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae)
        self.hidden = nn.Linear(d_in, config.hidden)
        self.out = nn.Linear(config.hidden, d_sae)

    def forward(self, x: Tensor) -> Tensor:
        # (batch, d_in) -> (batch, hidden) -> (batch, d_sae)
        return self.out(torch.relu(self.hidden(x)))

    def weight(self) -> Tensor | None:
        return None  # not x @ W.T + b: no single matrix describes the map
