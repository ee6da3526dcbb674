"""Run one SAE on the fused sparse path and on the dense reference path, for comparison tests."""

from __future__ import annotations

import copy

import torch

from sae_lightning.components.base import DeadLatents
from sae_lightning.sae import SparseAutoencoder


def grads(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in sae.named_parameters() if p.grad is not None}


def run_both(
    sae: SparseAutoencoder,
    x: torch.Tensor,
    dead: torch.Tensor | None = None,
    *,
    dead_at_forward: bool = False,
):
    """``[(out, loss, grads, model)]`` of the fused then the dense path (copies of ``sae``).

    The loss is the MSE, plus the AuxK term when ``dead`` (a ``(d_sae,)`` mask) is given;
    ``dead_at_forward`` also hands it to the forward pass, as the training module does.
    """
    results = []
    for fused in (True, False):
        model = copy.deepcopy(sae)
        model.fused = fused
        known = DeadLatents(dead) if dead_at_forward and dead is not None else None
        out = model.run(x, dead=known)
        loss = (x - out.x_hat).pow(2).sum(dim=1).mean()
        if dead is not None:
            residual = x - out.x_hat.detach()
            aux = model.sparsity.auxiliary_losses(out.aux_source, x, residual, model.decoder, dead)
            loss = loss + aux["auxk"]
        loss.backward()
        results.append((out, loss, grads(model), model))
    return results
