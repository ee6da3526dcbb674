"""TopK and BatchTopK selection when each rank holds a slice of the latents.

TopK (Gao et al. 2024): each rank takes the top k of its own pre-activations, the k candidate
values of every shard are all-gathered (values only: a rank needs to know which of *its*
candidates won, not the others' ids), and every rank takes the same global top k of the
gathered ``k x T`` values. Every entry of the global top k is in its own shard's top k, so the
selection is the one a single process makes on the whole row.

BatchTopK: the threshold is the ``k x global batch``-th largest activation over all latents and
all rows, so each rank's local top ``k x global batch`` values are gathered over the whole mesh
(both dimensions). Every rank keeps its own entries above the threshold and, of those equal to
it, the ones the rule's quota reaches in the global order (rows of the global batch, then
global latent ids): one more all-gather, of each rank's counts per row.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from sae_lightning.parallel.comm import all_gather
from sae_lightning.parallel.mesh import ShardLayout


class ShardCodes(NamedTuple):
    """This shard's part of a row-wise selection."""

    values: Tensor
    """``(batch, k)`` values of this shard's candidates; 0 where a candidate lost globally."""
    indices: Tensor
    """``(batch, k)`` local latent ids (``0 .. shard_size - 1``) of the candidates."""
    won: Tensor
    """``(batch, k)`` bool: the candidate is in the global top k."""


def sharded_topk(pre_acts: Tensor, k: int, layout: ShardLayout) -> ShardCodes:
    """The global top ``k`` of each row, restricted to this rank's latents.

    Args:
        pre_acts: ``(batch, shard_size)`` this shard's scores; ``-inf`` never wins over a
            finite value (AuxK masks the live latents with it).
        k: entries per row over all shards (at most ``d_sae``).
        layout: the mesh and this rank's place in it.

    Returns:
        The candidates, with gradients flowing to ``pre_acts`` through the winners only.
    """
    k_local = min(k, pre_acts.shape[1])
    values, indices = pre_acts.topk(k_local, dim=1, sorted=False)
    gathered = torch.cat(all_gather(values.detach(), layout.tp_group, "tp"), dim=1)
    positions = gathered.topk(k, dim=1, sorted=False).indices  # (batch, k) of k_local * T
    won = torch.zeros_like(gathered, dtype=torch.bool).scatter_(1, positions, True)
    won = won[:, layout.tp_rank * k_local : (layout.tp_rank + 1) * k_local]
    kept = torch.where(won & torch.isfinite(values), values, torch.zeros_like(values))
    return ShardCodes(kept, indices, won)


def batch_topk_threshold(
    acts: Tensor, n_keep: int, group: dist.ProcessGroup | None = None
) -> tuple[Tensor, Tensor]:
    """The ``n_keep``-th largest of all ranks' ``acts``, and the smallest positive kept one.

    A collective over ``group`` (one all-gather of ``n_keep`` values each).

    Args:
        acts: ``(batch, shard_size)`` this rank's non-negative activations.
        n_keep: entries kept over the ranks' rows and latents (``k x global batch``).
        group: the ranks selecting together; None: the whole mesh (training), the
            tensor-parallel group for a batch-local selection.

    Returns:
        ``(threshold, smallest)`` as scalars in fp32 or wider; ``smallest`` is ``inf`` when
        nothing positive is kept.
    """
    flat = acts.detach().reshape(-1)
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    top = flat.topk(min(n_keep, flat.numel()), sorted=False).values
    if top.numel() < n_keep:  # pad so every rank sends the same size
        top = torch.cat([top, top.new_full((n_keep - top.numel(),), -torch.inf)])
    dim = "mesh" if group is None else "tp"
    gathered = torch.cat(all_gather(top, group or dist.group.WORLD, dim))
    top = gathered.topk(n_keep, sorted=False).values
    smallest = torch.where(top > 0, top, torch.full_like(top, torch.inf)).min()
    return top.min(), smallest


def batch_topk_keep(
    acts: Tensor,
    threshold: Tensor,
    n_keep: int,
    layout: ShardLayout,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Which of this shard's entries the BatchTopK rule keeps: every entry above ``threshold``,
    and of those equal to it the first, in the order of the selecting ranks' global batch (its
    rows in data-parallel rank order, then global latent ids), as many as make ``n_keep``.

    A collective over ``group`` (as :func:`batch_topk_threshold`): one all-gather of this
    rank's place in the mesh, its count above the threshold and its ties per row.

    Returns:
        ``(batch, shard_size)`` bool.
    """
    above = acts > threshold
    tied = acts == threshold
    place = torch.tensor([layout.dp_rank, layout.tp_rank], device=acts.device)
    counts = torch.cat([place, above.sum().view(1), tied.sum(dim=1)])
    dim = "mesh" if group is None else "tp"
    table = torch.stack(all_gather(counts, group or dist.group.WORLD, dim))
    dp, tp, per_row = table[:, 0:1], table[:, 1:2], table[:, 3:]  # (ranks, 1), (ranks, batch)
    quota = n_keep - table[:, 2].sum()
    same_rows = per_row * (dp == layout.dp_rank)  # ties of the ranks holding these rows
    in_row = same_rows.sum(dim=0)
    ahead = (  # ties before this shard's entries of each row, in the global order
        (per_row * (dp < layout.dp_rank)).sum()
        + in_row.cumsum(0)
        - in_row
        + (same_rows * (tp < layout.tp_rank)).sum(dim=0)
    )
    rank = tied.long().cumsum(dim=1) - 1  # a tie's place among its row's ties on this shard
    return above | (tied & (ahead.unsqueeze(1) + rank < quota))
