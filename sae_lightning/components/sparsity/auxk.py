"""AuxK (Gao et al. 2024): dead latents learn to reconstruct what the live ones miss.

Shared by the TopK family. The top ``k_aux`` pre-activations among dead latents decode the
residual ``e = x - x_hat`` (no bias: the residual already excludes it). The term is normalised by
the batch's total variance and scaled by ``min(n_dead / k_aux, 1)`` as sparsify and SAELens do.
Under DDP the normaliser is this rank's share of the global batch's variance
(``total_variance_share``), so the average over ranks is the one-process term.
No form reads the device on the host: shapes are fixed by ``k_aux``, slots past a row's dead
latents hold 0, and with no dead latent the scale, hence the term, is exactly zero. On the fused
path the forward pass selects the dead latents from its own product chunks when it is given the
dead mask (:class:`DeadSelection`), so the term costs a sparse decode and no encoder work; the
caller may also bound how many latents are dead (:class:`DeadLatents`), which narrows the
selection to that many per row (0 skips the term).
"""

from __future__ import annotations

from typing import ClassVar, TypeVar

import torch
from pydantic import Field
from torch import Tensor

from sae_lightning.components.base import (
    AuxSource,
    Codes,
    DeadLatents,
    Decoder,
    SparsityFn,
    SparsityOutput,
    total_variance_share,
)
from sae_lightning.config import PluginConfig
from sae_lightning.kernels.encode import DeadSelection, EncoderInputs, dead_topk_encode


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
    return auxk_of_selection(values, indices, x, residual, decoder, dead, k_aux)


def auxk_of_selection(
    values: Tensor,
    indices: Tensor,
    x: Tensor,
    residual: Tensor,
    decoder: Decoder,
    dead: Tensor,
    k_aux: int,
) -> Tensor:
    """The AuxK term of the selected dead latents, ``(batch, width)`` values and ids (0 in the
    slots past a row's dead latents). With no dead latent the scale is 0 on the device, so the
    term is exactly zero without a host branch.

    Args:
        x, residual, decoder, dead, k_aux: as for :func:`auxk_loss`.
    """
    e_hat = decoder.decode_without_bias(Codes(values, indices, dead.shape[0]))
    k_aux = min(k_aux, dead.shape[0])
    scale = (dead.sum().to(values.dtype) / k_aux).clamp(max=1.0)
    total_variance = total_variance_share(x).clamp_min(1e-12)
    return scale * (e_hat - residual.detach()).pow(2).sum() / total_variance


def fused_auxk_loss(
    inputs: EncoderInputs, x: Tensor, residual: Tensor, decoder: Decoder, dead: Tensor, k_aux: int
) -> Tensor:
    """:func:`auxk_loss` without the ``(batch, d_sae)`` pre-activations, when the forward pass
    did not select the dead latents: the product of every latent again, in row chunks, of
    which each row keeps its top ``k_aux`` dead latents; the selected values go through the
    same sparse autograd function as the TopK forward. Shapes do not depend on how many
    latents are dead, so nothing is read on the host. Equals :func:`auxk_loss` on the full
    pre-activations.

    Args:
        inputs: the encoder inputs kept by the fused forward of this step.
        x, residual, decoder, dead, k_aux: as for :func:`auxk_loss`.
    """
    k_aux = min(k_aux, dead.shape[0])
    values, indices = dead_topk_encode(inputs, dead, k_aux)
    return auxk_of_selection(values, indices, x, residual, decoder, dead, k_aux)


def selected_auxk_loss(
    selection: DeadSelection,
    x: Tensor,
    residual: Tensor,
    decoder: Decoder,
    dead: Tensor,
    k_aux: int,
) -> Tensor:
    """:func:`auxk_loss` from the dead latents the fused forward pass selected: a sparse decode,
    no encoder work. ``selection`` must have been made with ``dead``; a width below
    ``min(k_aux, d_sae)`` means the caller bounded the dead latents by it (0: none is dead, and
    the term is 0).

    Args:
        selection: this step's :class:`DeadSelection`.
        x, residual, decoder, dead, k_aux: as for :func:`auxk_loss`.
    """
    if selection.values.shape[1] == 0:
        return x.new_zeros(())
    return auxk_of_selection(selection.values, selection.indices, x, residual, decoder, dead, k_aux)


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

    The dense term from ``(batch, d_sae)`` pre-activations; the fused one from the dead latents
    the forward pass selected (a :class:`DeadSelection` made with this ``dead``), else from the
    encoder's inputs; ``{}`` when ``coefficient`` is 0.

    Args:
        owner: the plugin's class name, for the error message.
        coefficient: ``aux_coefficient``.
        source: the pre-activations, the dead selection or the encoder inputs of this step.
        x, residual, decoder, dead, k_aux: as for :func:`auxk_loss`.

    Raises:
        ValueError: ``source`` is None.
    """
    if coefficient == 0:
        return {}
    if isinstance(source, DeadSelection):
        if source.dead is dead:
            aux = selected_auxk_loss(source, x, residual, decoder, dead, k_aux)
        else:  # selected with another mask: select again
            aux = fused_auxk_loss(source.inputs, x, residual, decoder, dead, k_aux)
    elif isinstance(source, EncoderInputs):
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


AuxKConfigT = TypeVar("AuxKConfigT", bound=AuxKConfig)


class AuxKSparsity(SparsityFn[AuxKConfigT]):
    """The AuxK side of a TopK-family plugin: its switch and its terms, from ``config`` and
    ``k_aux``, named ``auxk_owner`` in errors; and its fused path, which selects AuxK's dead
    latents in the forward pass when the step's dead latents are known."""

    auxk_owner: ClassVar[str]
    k_aux: int

    def __init__(self, config: AuxKConfigT, *, d_in: int, d_sae: int) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae)
        self.k_aux = config.aux_k if config.aux_k is not None else max(d_in // 2, 1)

    def fused_encode(
        self,
        inputs: EncoderInputs,
        *,
        step: int,
        decoder: Decoder,
        dead: DeadLatents | None = None,
    ) -> SparsityOutput:
        """Codes by :meth:`fused_select`, which also selects the ``dead_width(dead)`` dead latents
        of every row for AuxK when it is not None."""
        width = self.dead_width(dead)
        if width is None or dead is None:
            return self.fused_select(inputs, None, 0)
        return self.fused_select(inputs, dead.mask, width)

    def fused_select(
        self, inputs: EncoderInputs, dead: Tensor | None, width: int
    ) -> SparsityOutput:
        """The plugin's fused encode and selection; with ``dead`` (the ``(d_sae,)`` mask), also
        the top ``width`` dead latents of each row as the ``aux_source`` (else ``inputs``)."""
        raise NotImplementedError  # pragma: no cover - every subclass selects

    def dead_width(self, dead: DeadLatents | None) -> int | None:
        """Dead latents per row the fused forward pass selects for AuxK: ``min(k_aux, d_sae)``,
        or fewer when ``dead`` bounds how many are dead (every row has at most that many);
        None (select none, the term recomputes them) without a mask or with AuxK off."""
        if dead is None or self.config.aux_coefficient == 0:
            return None
        width = min(self.k_aux, self.d_sae)
        return width if dead.at_most is None else min(width, dead.at_most)

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
