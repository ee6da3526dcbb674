"""TopK of signed values, as in the Expander SAE code: the k largest pre-activations, kept signed.

The core ``topk`` applies ReLU to the selected values; the paper's code does not, so a selected
negative pre-activation stays negative (the paper notes trained models almost never select one).

With the ``expander`` encoder the SAE takes the encoder's fused path (:mod:`sae_expander.sparsify`):
the pre-activations are encoded and selected block by block and never exist for the whole batch,
and AuxK encodes the dead latents from the :class:`~sae_expander.fused.ExpanderInputs` that path
returns as its ``aux_source`` (the SAE hands it back; the plugin keeps no state between the two
calls). On the dense path (``sae.fused = False``, the reference) with the ``expander``
decoder, the selected values are recomputed from the encoder's input in ``O(batch * k * d)``
(``decoder.gather_pre_activations``), so no gradient flows into the dense pre-activations either;
with any other decoder they are gathered from the pre-activations as usual.

Selection uses the core's ``topk_select``, a deterministic function of each row, so the dense and
the fused path pick the same latents, ties included.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from sae_expander.fused import ExpanderInputs, topk_among
from sae_lightning.components.base import (
    AuxSource,
    Codes,
    Decoder,
    SparsityFn,
    SparsityOutput,
    total_variance_share,
)
from sae_lightning.components.sparsity.auxk import AuxKConfig
from sae_lightning.components.sparsity.topk import check_k
from sae_lightning.kernels.select import topk_select


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


def _dead_topk(pre: Tensor, dead: Tensor, k: int) -> Tensor:
    """``(batch, min(k, n_dead))`` ids of the largest pre-activations among dead latents.

    ``topk_select`` over the dead latents' columns, in latent order: the selection the fused
    path's :func:`~sae_expander.fused.topk_among` makes, ties included.
    """
    ids = dead.nonzero().squeeze(1)  # (n_dead,)
    local = topk_select(pre.index_select(1, ids), min(k, ids.numel()))[1]
    return ids[local]


class SignedTopK(SparsityFn[SignedTopKConfig]):
    """Signed TopK: keep the k largest pre-activations per row with their sign (no ReLU); AuxK."""

    def __init__(self, config: SignedTopKConfig, *, d_in: int, d_sae: int) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae)
        check_k(config.k, d_sae)
        self.k_aux = config.aux_k if config.aux_k is not None else max(d_in // 2, 1)

    def forward(self, pre_acts: Tensor, *, step: int, decoder: Decoder) -> SparsityOutput:
        indices = topk_select(pre_acts.detach(), self.config.k)[1]  # (batch, k)
        return SparsityOutput(Codes(selected(pre_acts, indices, decoder), indices, self.d_sae), {})

    @property
    def auxiliary_loss_switch(self) -> str | None:
        return "aux_coefficient" if self.config.aux_coefficient > 0 else None

    def auxiliary_losses(
        self,
        source: AuxSource | ExpanderInputs | None,
        x: Tensor,
        residual: Tensor,
        decoder: Decoder,
        dead: Tensor,
    ) -> dict[str, Tensor]:
        """AuxK exactly as the core's ``auxk_loss``, with the selected values gathered cheaply.

        ``source`` is the ``(batch, d_sae)`` pre-activations (dense path) or the encoder inputs
        a fused forward returned as its ``aux_source``; from those, only the dead latents are
        encoded. With no dead latent the term is zero and no selection runs; checking costs one
        host sync on accelerators (nothing on CPU).

        Raises:
            ValueError: ``source`` is None.
        """
        if self.config.aux_coefficient == 0:
            return {}
        if source is None:
            raise ValueError(
                "SignedTopK.auxiliary_losses got no source; pass the aux_source of this step's "
                "SparseAutoencoder.run output (ForwardOutput.aux_source), or the (batch, d_sae) "
                "pre-activations"
            )
        if not bool(dead.any()):
            return {"auxk": residual.new_zeros(())}
        k_aux = min(self.k_aux, self.d_sae)
        if isinstance(source, ExpanderInputs):
            ids = dead.nonzero().squeeze(1)  # (n_dead,)
            values, indices = topk_among(source, ids, k_aux)  # (batch, min(k_aux, n_dead))
        else:
            assert isinstance(source, Tensor)
            indices = _dead_topk(source.detach(), dead, k_aux)  # (batch, min(k_aux, n_dead))
            values = selected(source, indices, decoder)
        e_hat = decoder.decode_without_bias(Codes(values, indices, self.d_sae))
        scale = (dead.sum().to(residual.dtype) / k_aux).clamp(max=1.0)
        total_variance = total_variance_share(x).clamp_min(1e-12)
        aux = scale * (e_hat - residual.detach()).pow(2).sum() / total_variance
        return {"auxk": self.config.aux_coefficient * aux}
