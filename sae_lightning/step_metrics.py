"""The logged metrics of one training step, local or e2e, with one rule under DDP.

Both training modes log the same core metrics (loss, each term, L0, FVU) and advance the
dead-latent counters from the step's fire counts. Under DDP one all-reduce per step makes every
rank log global values: means over ranks for the per-row metrics, and for FVU the global
``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` from summed statistics, as the torchmetrics
:class:`~sae_lightning.metrics.FractionOfVarianceUnexplained` computes it, so the value does not
depend on how the batch was split over ranks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from sae_lightning.components.base import Codes, data_parallel_world_size
from sae_lightning.metrics import fvu_of_residual


class StepStatistics(NamedTuple):
    """A step's metrics and counts, over all ranks."""

    metrics: dict[str, Tensor]
    """``train/...`` scalars, ``train/fvu`` included."""
    fire_counts: Tensor
    """``(d_sae,)`` rows each latent fired in."""
    n_samples: int | Tensor
    """Samples (tokens, or functions) in the global batch."""


@torch.no_grad()
def core_metrics(loss: Tensor, terms: dict[str, Tensor], codes: Codes) -> dict[str, Tensor]:
    """``train/loss``, ``train/loss/<term>`` and ``train/l0`` of this rank's rows."""
    metrics = {"train/loss": loss.detach()}
    metrics.update({f"train/loss/{k}": v.detach().float() for k, v in terms.items()})
    metrics["train/l0"] = codes.l0().float().mean()
    return metrics


@torch.no_grad()
def global_step_statistics(
    metrics: dict[str, Tensor], x: Tensor, residual: Tensor, n_samples: int, fire_counts: Tensor
) -> StepStatistics:
    """``metrics`` averaged over ranks plus the global FVU, fire counts and sample count.

    Under DDP this is a collective (one all-reduce): every rank must call it.

    Args:
        metrics: this rank's scalar metrics.
        x: ``(rows, d_in)`` this rank's inputs (grid points as rows for function batches).
        residual: ``x - x_hat`` in the same layout.
        n_samples: this rank's number of samples (tokens, or functions).
        fire_counts: this rank's ``(d_sae,)`` fire counts.
    """
    world = data_parallel_world_size()
    if world == 1:
        metrics = {**metrics, "train/fvu": fvu_of_residual(x, residual).float()}
        return StepStatistics(metrics, fire_counts, n_samples)
    x64 = x.detach().double()
    names = list(metrics)
    n = len(names)
    packed = torch.cat(
        [
            torch.stack([metrics[k].double() for k in names]) / world,
            residual.detach().double().pow(2).sum().view(1),
            x64.pow(2).sum().view(1),
            x64.new_tensor([x.shape[0], n_samples]),
            fire_counts.double(),
            x64.sum(dim=0),
        ]
    )
    dist.all_reduce(packed)
    sq_err, sum_sq, rows, samples = packed[n], packed[n + 1], packed[n + 2], packed[n + 3]
    counts = packed[n + 4 : n + 4 + fire_counts.numel()]
    sum_x = packed[n + 4 + fire_counts.numel() :]
    total_variance = (sum_sq - sum_x.pow(2).sum() / rows).clamp_min(1e-12)
    reduced = {k: packed[i].float() for i, k in enumerate(names)}
    reduced["train/fvu"] = (sq_err / total_variance).float()
    return StepStatistics(reduced, counts.round().long(), samples.round().long())
