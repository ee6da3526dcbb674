"""BatchTopK (Bussmann et al. 2024): the top k x batch activations over the whole batch.

A variable number of latents is active per row while the average L0 is k in training.
At inference the batch dependence is replaced by a global threshold: an exponential moving
average of the smallest selected activation, as SAELens keeps it.

Selection keeps every activation ``>=`` the ``(k x batch)``-th largest one. Ties at that value
are all kept, so L0 exceeds k by the number of tied entries (none with continuous fp32 inputs;
at a zero threshold the extra entries are zeros and change nothing). The rule does not depend
on how the batch is split, which is what makes data parallelism exact: under DDP the batch is
the GLOBAL one. Each rank takes its local top ``k x global batch`` values, all-gathers them
(values only, fp32), finds the global threshold and keeps its own entries ``>=`` it, so W ranks
select exactly what one process selects on the concatenated batch, and every rank updates the
running threshold identically. This needs equal local batch sizes, as Lightning's DDP gives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from pydantic import Field
from torch import Tensor

from sae_lightning.components.base import (
    Codes,
    Decoder,
    SparsityFn,
    SparsityOutput,
    data_parallel_world_size,
)
from sae_lightning.components.sparsity.auxk import AuxKConfig, auxk_loss
from sae_lightning.components.sparsity.topk import check_k


class BatchTopKConfig(AuxKConfig):
    k: int = Field(32, gt=0, description="mean active latents per row (k x batch kept per batch)")
    threshold_momentum: float = Field(
        0.01, gt=0, le=1, description="EMA rate of the inference threshold (SAELens: 0.01)"
    )


def select_batch_topk(acts: Tensor, k: int, *, across_ranks: bool) -> tuple[Tensor, Tensor]:
    """Keep the entries of ``acts`` (batch, d_sae) ``>=`` the ``k * batch``-th largest.

    Args:
        acts: non-negative activations of this rank's rows.
        k: mean number of active latents per row.
        across_ranks: select over the global batch of all DDP ranks (a collective: every rank
            must call it); ignored without an initialised process group.

    Returns:
        ``(codes, smallest)``: the codes (same shape and dtype as ``acts``) and, as an fp32
        scalar, the smallest positive kept value (``inf`` when nothing positive was kept).
    """
    world = data_parallel_world_size() if across_ranks else 1
    n_keep = k * acts.shape[0] * world
    flat = acts.detach().reshape(-1)
    top = flat.topk(min(n_keep, flat.numel()), sorted=False).values.float()
    if world > 1:
        if top.numel() < n_keep:  # d_sae < k * world: pad so every rank sends the same size
            top = torch.cat([top, top.new_full((n_keep - top.numel(),), -torch.inf)])
        gathered = [torch.empty_like(top) for _ in range(world)]
        dist.all_gather(gathered, top)
        # Every entry of the global top n_keep is in its own rank's local top n_keep.
        top = torch.cat(gathered).topk(n_keep, sorted=False).values
    threshold = top.min()
    smallest = torch.where(top > 0, top, torch.full_like(top, torch.inf)).min()
    return acts.masked_fill(acts < threshold, 0.0), smallest


def batch_topk(acts: Tensor, k: int) -> Tensor:
    """Keep the ``k * batch`` largest entries of ``acts`` (batch, d_sae), zero the rest."""
    return select_batch_topk(acts, k, across_ranks=False)[0]


class BatchTopK(SparsityFn):
    """BatchTopK: top k x batch ReLU activations per batch; a running threshold at inference."""

    Config = BatchTopKConfig
    config: BatchTopKConfig

    def __init__(self, config: BatchTopKConfig, *, d_in: int, d_sae: int) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae)
        check_k(config.k, d_sae)
        self.k_aux = config.aux_k if config.aux_k is not None else max(d_in // 2, 1)
        # Negative means "not measured yet"; inference then falls back to batch selection.
        # Kept in fp32 whatever the training precision.
        self.register_buffer("threshold", torch.tensor(-1.0))

    def forward(self, pre_acts: Tensor, *, step: int, decoder: Decoder) -> SparsityOutput:
        acts = torch.relu(pre_acts)
        if self.training:
            codes, smallest = select_batch_topk(acts, self.config.k, across_ranks=True)
            self._update_threshold(smallest)
        elif bool(self.threshold >= 0):
            codes = acts * (acts > self.threshold)
        else:
            codes = batch_topk(acts, self.config.k)
        return SparsityOutput(Codes(codes, None, self.d_sae), {})

    @torch.no_grad()
    def _update_threshold(self, smallest: Tensor) -> None:
        has_any = torch.isfinite(smallest)
        old = self.threshold
        ema = torch.where(
            old < 0, smallest, old + self.config.threshold_momentum * (smallest - old)
        )
        self.threshold.copy_(torch.where(has_any, ema, old))

    def auxiliary_losses(
        self, pre_acts: Tensor, x: Tensor, residual: Tensor, decoder: Decoder, dead: Tensor
    ) -> dict[str, Tensor]:
        if self.config.aux_coefficient == 0:
            return {}
        aux = auxk_loss(pre_acts, x, residual, decoder, dead, self.k_aux)
        return {"auxk": self.config.aux_coefficient * aux}
