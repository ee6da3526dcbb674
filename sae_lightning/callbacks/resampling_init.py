"""How the resampler initialises the latents it revives: directions, encoder norms, optimizer state.

Pure functions of the SAE and the candidate inputs, used by
:class:`~sae_lightning.callbacks.resampling.DeadFeatureResampler` (see docs/resampling.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from sae_lightning.components.base import Touched

if TYPE_CHECKING:
    from sae_lightning.callbacks.resampling_view import ResamplingView

_LOSS_CHUNK = 4096  # rows per forward pass when scoring candidates
_KMEANS_ITERS = 5  # refinement steps of the residual clusters; the draws are the seeds
_NORM_RANGE = (0.05, 20.0)  # threshold norms, as multiples of the mean live norm


@torch.no_grad()
def squared_errors(view: ResamplingView, x: Tensor) -> Tensor:
    """``(n,)`` ``||x - x_hat||^2`` per row, in eval mode (no batch statistics).

    Args:
        view: the SAE, whole or sharded (:mod:`.resampling_view`).
        x: ``(n, d_in)`` inputs.
    """
    return torch.cat(
        [(c - view.reconstruct(c)).float().pow(2).sum(dim=1) for c in x.split(_LOSS_CHUNK)]
    )


@torch.no_grad()
def assign(residuals: Tensor, directions: Tensor) -> Tensor:
    """``(n,)`` for each residual the direction it is most aligned with; -1 when none is
    positively aligned.

    Args:
        residuals: ``(n, d_in)`` residuals ``x - x_hat``.
        directions: ``(m, d_in)`` unit-norm directions.
    """
    out = []
    for chunk in residuals.split(_LOSS_CHUNK):
        cos = (chunk / chunk.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ directions.T
        best, index = cos.max(dim=1)  # (chunk,)
        out.append(torch.where(best > 0, index, -1))
    return torch.cat(out)


@torch.no_grad()
def residual_clusters(residuals: Tensor, errors: Tensor, seeds: Tensor) -> Tensor:
    """Refine ``seeds`` into centres of clusters of ``residuals`` (weighted spherical k-means).

    A single badly reconstructed input mixes every atom the SAE misses on it; the mean of the
    residuals most aligned with it keeps what they share (one missing atom) and averages the
    rest away. Each residual counts with its squared error, so badly reconstructed inputs
    dominate, as in the draw. A centre that attracts no residual keeps its seed.

    Args:
        residuals: ``(n, d_in)`` candidates' residuals ``x - x_hat``.
        errors: ``(n,)`` their squared errors ``||x - x_hat||^2``.
        seeds: ``(m, d_in)`` the drawn residuals, one per dead latent.

    Returns:
        ``(m, d_in)`` unit-norm cluster centres.
    """
    centres = seeds / seeds.norm(dim=1, keepdim=True).clamp_min(1e-12)
    for _ in range(_KMEANS_ITERS):
        index = assign(residuals, centres)
        keep = index >= 0
        sums = torch.zeros_like(centres).index_add_(
            0, index[keep], residuals[keep] * errors[keep].unsqueeze(1)
        )
        length = sums.norm(dim=1, keepdim=True)
        centres = torch.where(length > 0, sums / length.clamp_min(1e-12), centres)
    return centres


@torch.no_grad()
def threshold_norms(
    view: ResamplingView, x: Tensor, residuals: Tensor, directions: Tensor, mean_alive: Tensor
) -> Tensor:
    """``(m,)`` per new latent, the encoder-row norm at which it enters the top k on the
    median input of its cluster (the inputs whose residual is most aligned with it).

    An input's threshold is its smallest active latent: a new row ``s * u`` with bias 0 has
    pre-activation ``s * u . x_c`` (``x_c``: the input as the encoder sees it), so it is
    selected when ``s >= threshold / (u . x_c)``. Rows at Anthropic's 0.2 x the live norm
    never reach the top k; rows at the live norm fire on many inputs they cannot help, and the
    gradient shuts them off (docs/resampling.md). Clamped to [0.05, 20] x ``mean_alive``; a
    latent with no input in its cluster gets ``mean_alive``. ``view`` is the SAE, whole or
    sharded (:mod:`.resampling_view`).
    """
    index = assign(residuals, directions)
    thresholds, projections = [], []
    for chunk, ids in zip(x.split(_LOSS_CHUNK), index.split(_LOSS_CHUNK), strict=True):
        thresholds.append(view.smallest_active(chunk))  # (chunk,)
        u = directions[ids.clamp_min(0)]
        projections.append((view.encoder_input(chunk).float() * u).sum(dim=1))
    threshold, projection = torch.cat(thresholds), torch.cat(projections)
    valid = (index >= 0) & (projection > 0)
    ratio = threshold[valid] / projection[valid]
    group = index[valid]
    # Per-group median: sort by ratio, then stably by group; take each group's middle entry.
    ratio, order = ratio.sort()
    group, regroup = group[order].sort(stable=True)
    ratio = ratio[regroup]
    counts = torch.bincount(group, minlength=directions.shape[0])
    starts = counts.cumsum(0) - counts
    middle = (starts + (counts - 1).clamp_min(0) // 2).clamp_max(max(ratio.numel() - 1, 0))
    low, high = (f * mean_alive for f in _NORM_RANGE)
    median = ratio[middle] if ratio.numel() else mean_alive.expand(counts.shape)
    return torch.where(counts > 0, median.clamp(low, high), mean_alive)


@torch.no_grad()
def encode_values(sae: torch.nn.Module, x: Tensor) -> Tensor:
    """The code values of ``x`` in eval mode: ``(n, k)`` when sparse, ``(n, d_sae)`` dense."""
    was_training = sae.training
    sae.eval()
    try:
        return sae.encode_codes(x).padded().values.float()
    finally:
        sae.train(was_training)


@torch.no_grad()
def reconstruct(sae: torch.nn.Module, x: Tensor) -> Tensor:
    """``sae(x)`` in eval mode (no batch statistics, no collectives), chunked."""
    was_training = sae.training
    sae.eval()
    try:
        return torch.cat([sae(chunk) for chunk in x.split(_LOSS_CHUNK)])
    finally:
        sae.train(was_training)


_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")  # Adam / AMSGrad


@torch.no_grad()
def reset_optimizer_state(
    optimizers: list[torch.optim.Optimizer],
    touched: list[Touched],
    second_moment: Literal["zero", "live_mean"] = "zero",
) -> None:
    """Zero every per-element optimizer state (Adam moments...) of the ``touched`` slices.

    Per-parameter scalars such as Adam's ``step`` are shared by all rows and left alone.

    Args:
        optimizers: the trainer's optimizers; the one holding each parameter is reset.
        touched: the rewritten parameter slices.
        second_moment: ``"live_mean"`` sets Adam's second moment of the slices to the mean of
            the slices kept (per remaining coordinate) instead of zero (see docs/resampling.md).
    """
    for param, index, dim in touched:
        for optimizer in optimizers:
            state = optimizer.state.get(param)
            if not state:
                continue
            for key, value in state.items():
                if key == "step" or not isinstance(value, Tensor) or value.shape != param.shape:
                    continue
                ids = index.to(value.device)
                if second_moment == "live_mean" and key in _SECOND_MOMENTS:
                    keep = torch.ones(value.shape[dim], dtype=torch.bool, device=value.device)
                    keep[ids] = False
                    if bool(keep.any()):
                        mean = value.index_select(dim, keep.nonzero().squeeze(1)).mean(
                            dim=dim, keepdim=True
                        )
                        value.index_copy_(dim, ids, mean.expand_as(value.index_select(dim, ids)))
                        continue
                value.index_fill_(dim, ids, 0)
