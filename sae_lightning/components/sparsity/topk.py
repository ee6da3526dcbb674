"""TopK (Gao et al. 2024): keep the k largest pre-activations per row, ReLU them.

With a linear encoder the SAE calls :meth:`TopK.fused_encode`, which never materialises the
``(batch, d_sae)`` pre-activations and whose backward touches only the ``k`` selected latents
per row (:mod:`sae_lightning.kernels.encode`). :meth:`TopK.forward` is the dense path for
any other encoder, and the reference the fused path is tested against.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from sae_lightning.components.base import (
    AuxSource,
    Codes,
    Decoder,
    PeerActivation,
    SparsityOutput,
)
from sae_lightning.components.sparsity.auxk import AuxKConfig, AuxKSparsity
from sae_lightning.errors import ConfigError
from sae_lightning.kernels.encode import EncoderInputs, topk_encode, topk_encode_with_dead
from sae_lightning.kernels.select import topk_select


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


class TopK(AuxKSparsity[TopKConfig]):
    """TopK: the k largest pre-activations per row, ReLU'd; sparse codes; AuxK for dead latents."""

    auxk_owner = "TopK"

    def __init__(self, config: TopKConfig, *, d_in: int, d_sae: int) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae)
        check_k(config.k, d_sae)

    def forward(self, pre_acts: Tensor, *, step: int, decoder: Decoder) -> SparsityOutput:
        values, indices = topk_select(pre_acts, self.config.k)  # (batch, k)
        return SparsityOutput(Codes(torch.relu(values), indices, self.d_sae), {})

    def fused_select(
        self, inputs: EncoderInputs, dead: Tensor | None, width: int
    ) -> SparsityOutput:
        """Encode and select in one sparse autograd step: the top k of ``inputs``' product.

        Args:
            inputs: the linear encoder's input, centring shift, weight and bias.
            dead, width: the ``(d_sae,)`` dead mask, when AuxK's top ``width`` dead latents per
                row are selected from the same product chunks.

        Returns:
            The codes; the ``aux_source`` is AuxK's selection when ``dead`` is given, else
            ``inputs`` (the pre-activations are never materialised; the AuxK term of the same
            step then recomputes what it needs).
        """
        source: AuxSource
        if dead is None:
            values, indices = topk_encode(inputs, self.config.k)
            source = inputs
        else:
            values, indices, source = topk_encode_with_dead(inputs, self.config.k, dead, width)
        codes = Codes(torch.relu(values), indices, self.d_sae)
        return SparsityOutput(codes, {}, source)

    def peer_activation(self) -> PeerActivation:
        """SAELens ``topk`` and sparsify's TopK: ReLU of the ``k`` largest pre-activations."""
        return PeerActivation("topk", k=int(self.config.k))
