"""AuxK (Gao et al. 2024): dead latents learn to reconstruct what the live ones miss.

Shared by the TopK family. The top ``k_aux`` pre-activations among dead latents decode the
residual ``e = x - x_hat`` (no bias: the residual already excludes it). The term is normalised by
the batch's total variance and scaled by ``min(n_dead / k_aux, 1)`` as sparsify and SAELens do.
Under DDP the normaliser is this rank's share of the global batch's variance
(``total_variance_share``), so the average over ranks is the one-process term.
The dense form (:func:`auxk_loss`) never synchronises with the host: with no dead latent the
term is exactly zero. The fused form (:func:`fused_auxk_loss`), used when the TopK forward ran
sparse, reads the number of dead latents (free on CPU, one host sync on accelerators) so that it
can skip the term outright or multiply the encoder by the dead latents' rows only.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from sae_lightning.components.base import (
    AuxSource,
    Codes,
    Decoder,
    SparsityFn,
    total_variance_share,
)
from sae_lightning.config import PluginConfig
from sae_lightning.kernels.encode import EncoderInputs, topk_encode


class AuxKConfig(PluginConfig):
    """Parameters shared by the TopK family for the AuxK dead-latent loss."""

    aux_k: int | None = Field(
        None, gt=0, description="dead latents used by AuxK; default d_in // 2 (sparsify, SAELens)"
    )
    aux_coefficient: float = Field(
        1 / 32, ge=0, description="weight of the AuxK term (OpenAI: 1/32); 0 disables it"
    )


def auxk_loss(
    pre_acts: Tensor, x: Tensor, residual: Tensor, decoder: Decoder, dead: Tensor, k_aux: int
) -> Tensor:
    """``min(n_dead/k_aux, 1) * ||e - e_hat||^2 / ||x - mean(x)||^2`` over the batch.

    Args:
        pre_acts: ``(batch, d_sae)`` encoder output.
        x: ``(batch, d_in)`` inputs, for the variance normaliser.
        residual: ``(batch, d_in)`` ``x - x_hat`` with ``x_hat`` detached.
        decoder: decodes the auxiliary codes.
        dead: ``(d_sae,)`` bool mask of dead latents.
        k_aux: number of auxiliary latents per row (at most ``d_sae``).
    """
    k_aux = min(k_aux, pre_acts.shape[1])
    masked = torch.where(dead.unsqueeze(0), pre_acts, torch.full_like(pre_acts, -torch.inf))
    values, indices = masked.topk(k_aux, dim=1, sorted=False)  # (batch, k_aux)
    values = torch.where(torch.isfinite(values), values, torch.zeros_like(values))
    e_hat = decoder.decode_without_bias(Codes(values, indices, pre_acts.shape[1]))
    n_dead = dead.sum().to(pre_acts.dtype)
    scale = (n_dead / k_aux).clamp(max=1.0)
    total_variance = total_variance_share(x).clamp_min(1e-12)
    return scale * (e_hat - residual.detach()).pow(2).sum() / total_variance


def fused_auxk_loss(
    inputs: EncoderInputs, x: Tensor, residual: Tensor, decoder: Decoder, dead: Tensor, k_aux: int
) -> Tensor:
    """:func:`auxk_loss` without the ``(batch, d_sae)`` pre-activations.

    The pre-activations of the dead latents alone are recomputed from the encoder's inputs, in
    row chunks, and their top ``k_aux`` per row go through the same sparse autograd function as
    the TopK forward; the cost is ``n_dead / d_sae`` of the encoder product, nothing when none
    is dead. The result equals :func:`auxk_loss` on the full pre-activations.

    Args:
        inputs: the encoder inputs kept by the fused forward of this step.
        x, residual, decoder, dead, k_aux: as for :func:`auxk_loss`.
    """
    d_sae = dead.shape[0]
    k_aux = min(k_aux, d_sae)
    rows = dead.nonzero().squeeze(1)  # (n_dead,) latent ids; host sync on accelerators
    n_dead = rows.numel()
    if n_dead == 0:
        return x.new_zeros(())
    # (batch, min(k_aux, n_dead)) pre-activations and global latent ids
    values, indices = topk_encode(inputs, min(k_aux, n_dead), rows=rows)
    e_hat = decoder.decode_without_bias(Codes(values, indices, d_sae))
    scale = min(n_dead / k_aux, 1.0)
    total_variance = total_variance_share(x).clamp_min(1e-12)
    return scale * (e_hat - residual.detach()).pow(2).sum() / total_variance


def auxk_terms(
    owner: str,
    coefficient: float,
    source: AuxSource | None,
    x: Tensor,
    residual: Tensor,
    decoder: Decoder,
    dead: Tensor,
    k_aux: int,
) -> dict[str, Tensor]:
    """``{"auxk": coefficient * term}`` for a TopK-family plugin's ``auxiliary_losses``.

    The dense term from ``(batch, d_sae)`` pre-activations, the fused one from the encoder's
    inputs (the ``aux_source`` of the plugin's ``fused_encode``); ``{}`` when ``coefficient``
    is 0.

    Args:
        owner: the plugin's class name, for the error message.
        coefficient: ``aux_coefficient``.
        source: the pre-activations or the encoder inputs of this step.
        x, residual, decoder, dead, k_aux: as for :func:`auxk_loss`.

    Raises:
        ValueError: ``source`` is None.
    """
    if coefficient == 0:
        return {}
    if isinstance(source, EncoderInputs):
        aux = fused_auxk_loss(source, x, residual, decoder, dead, k_aux)
    elif source is not None:
        aux = auxk_loss(source, x, residual, decoder, dead, k_aux)
    else:
        raise ValueError(
            f"{owner}.auxiliary_losses got no source; pass the aux_source of this step's "
            "SparseAutoencoder.run output (ForwardOutput.aux_source), or the (batch, d_sae) "
            "pre-activations"
        )
    return {"auxk": coefficient * aux}


class AuxKSparsity(SparsityFn):
    """The AuxK side of a TopK-family plugin: its switch and its terms, from ``config`` and
    ``k_aux`` (set by the subclass), named ``auxk_owner`` in errors."""

    auxk_owner: ClassVar[str]
    config: AuxKConfig
    k_aux: int

    @property
    def auxiliary_loss_switch(self) -> str | None:
        return "aux_coefficient" if self.config.aux_coefficient > 0 else None

    def auxiliary_losses(
        self, source: AuxSource | None, x: Tensor, residual: Tensor, decoder: Decoder, dead: Tensor
    ) -> dict[str, Tensor]:
        coefficient = self.config.aux_coefficient
        return auxk_terms(
            self.auxk_owner, coefficient, source, x, residual, decoder, dead, self.k_aux
        )
