"""TopK (Gao et al. 2024): keep the k largest pre-activations per row, ReLU them.

With a linear encoder the SAE calls :meth:`TopK.fused_encode`, which never materialises the
``(batch, d_sae)`` pre-activations and whose backward touches only the ``k`` selected latents
per row (:mod:`sae_lightning.kernels.topk_encoder`). :meth:`TopK.forward` is the dense path for
any other encoder, and the reference the fused path is tested against.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from sae_lightning.components.base import Codes, Decoder, SparsityFn, SparsityOutput
from sae_lightning.components.sparsity.auxk import AuxKConfig, auxk_terms
from sae_lightning.errors import ConfigError
from sae_lightning.kernels.topk_encoder import EncoderInputs, topk_encode, topk_select


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
        # What the last fused forward fed the encoder, for the fused AuxK term of the same step.
        self._encoder_inputs: EncoderInputs | None = None

    def forward(self, pre_acts: Tensor, *, step: int, decoder: Decoder) -> SparsityOutput:
        values, indices = topk_select(pre_acts, self.config.k)  # (batch, k)
        return SparsityOutput(Codes(torch.relu(values), indices, self.d_sae), {})

    def fused_encode(
        self, inputs: EncoderInputs, *, step: int, decoder: Decoder
    ) -> tuple[SparsityOutput, Tensor | None]:
        """Encode and select in one sparse autograd step: the top k of ``inputs``' product.

        Args:
            inputs: the linear encoder's input, centring shift, weight and bias.
            step, decoder: as for :meth:`forward`.

        Returns:
            The codes, and None for the pre-activations, which are never materialised; the
            AuxK term of the same step recomputes what it needs from the inputs kept here.
        """
        values, indices = topk_encode(inputs, self.config.k)
        self._encoder_inputs = inputs if torch.is_grad_enabled() else None
        return SparsityOutput(Codes(torch.relu(values), indices, self.d_sae), {}), None

    def auxiliary_losses(
        self, pre_acts: Tensor | None, x: Tensor, residual: Tensor, decoder: Decoder, dead: Tensor
    ) -> dict[str, Tensor]:
        inputs, self._encoder_inputs = self._encoder_inputs, None
        return auxk_terms(
            "TopK",
            self.config.aux_coefficient,
            pre_acts,
            inputs,
            x,
            residual,
            decoder,
            dead,
            self.k_aux,
        )
