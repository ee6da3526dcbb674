"""TopK of signed values, as in the Expander SAE code: the k largest pre-activations, kept signed.

The core ``topk`` applies ReLU to the selected values; the paper's code does not, so a selected
negative pre-activation stays negative (the paper notes trained models almost never select one).

With the ``expander`` decoder the selected values are recomputed from the encoder's input in
``O(batch * k * d)`` (``decoder.gather_pre_activations``), so no gradient ever flows into the
dense ``(batch, d_sae)`` pre-activations and the backward pass costs ``O(batch * k * d)``; with
any other decoder they are gathered from the pre-activations as usual.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from sae_lightning.components.base import Codes, Decoder, SparsityFn, SparsityOutput
from sae_lightning.components.sparsity.auxk import AuxKConfig
from sae_lightning.errors import ConfigError


class SignedTopKConfig(AuxKConfig):
    k: int = Field(32, gt=0, description="active latents per row, kept with their sign")


def selected(pre_acts: Tensor, indices: Tensor, decoder: Decoder) -> Tensor:
    """``pre_acts.gather(1, indices)``, via the decoder's cheap-gradient recompute if it has one."""
    if torch.is_grad_enabled() and pre_acts.requires_grad:
        gather = getattr(decoder, "gather_pre_activations", None)
        values = gather(pre_acts, indices) if gather is not None else None
        if values is not None:
            return values
    return pre_acts.gather(1, indices)


_AUX_CHUNK_ELEMENTS = 1 << 22
"""AuxK masks the pre-activations in row chunks of about this many elements, so its memory does
not grow with the batch."""


def _dead_topk(pre: Tensor, dead: Tensor, k: int) -> Tensor:
    """``(batch, k)`` ids of the ``k`` largest pre-activations among dead latents, per row."""
    step = max(1, _AUX_CHUNK_ELEMENTS // max(pre.shape[1], 1))
    alive = ~dead
    return torch.cat(
        [
            pre[s : s + step].masked_fill(alive, -torch.inf).topk(k, dim=1, sorted=False).indices
            for s in range(0, pre.shape[0], step)
        ]
    )


class SignedTopK(SparsityFn):
    """Signed TopK: keep the k largest pre-activations per row with their sign (no ReLU); AuxK."""

    Config = SignedTopKConfig
    config: SignedTopKConfig

    def __init__(self, config: SignedTopKConfig, *, d_in: int, d_sae: int) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae)
        if config.k > d_sae:
            raise ConfigError(
                "k",
                f"k={config.k} is larger than the dictionary (d_sae={d_sae})",
                "choose k <= d_sae, or enlarge the dictionary with model.d_sae",
            )
        self.k_aux = config.aux_k if config.aux_k is not None else max(d_in // 2, 1)

    def forward(self, pre_acts: Tensor, *, step: int, decoder: Decoder) -> SparsityOutput:
        indices = pre_acts.detach().topk(self.config.k, dim=1, sorted=False).indices  # (batch, k)
        return SparsityOutput(Codes(selected(pre_acts, indices, decoder), indices, self.d_sae), {})

    def auxiliary_losses(
        self, pre_acts: Tensor, x: Tensor, residual: Tensor, decoder: Decoder, dead: Tensor
    ) -> dict[str, Tensor]:
        """AuxK exactly as the core's ``auxk_loss``, with the selected values gathered cheaply.

        With no dead latent the term is zero and the ``(batch, d_sae)`` selection is skipped;
        checking costs one host sync on accelerators (nothing on CPU).
        """
        if self.config.aux_coefficient == 0:
            return {}
        if not bool(dead.any()):
            return {"auxk": pre_acts.new_zeros(())}
        k_aux = min(self.k_aux, self.d_sae)
        indices = _dead_topk(pre_acts.detach(), dead, k_aux)  # (batch, k_aux)
        real = dead[indices]  # False where a row had fewer than k_aux dead latents
        values = torch.where(real, selected(pre_acts, indices, decoder), 0.0)
        e_hat = decoder.decode_without_bias(Codes(values, indices, self.d_sae))
        scale = (dead.sum().to(pre_acts.dtype) / k_aux).clamp(max=1.0)
        total_variance = (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
        aux = scale * (e_hat - residual.detach()).pow(2).sum() / total_variance
        return {"auxk": self.config.aux_coefficient * aux}
