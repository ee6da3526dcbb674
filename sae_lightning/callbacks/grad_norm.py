"""The global L2 norm of the gradients, logged as ``train/grad_norm``."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from typing_extensions import override

from sae_lightning.cadence import logs_step


@torch.no_grad()
def global_grad_norm(module: torch.nn.Module) -> torch.Tensor | None:
    """``sqrt(sum ||g||^2)`` over every parameter gradient, in float32; None without gradients."""
    norms = [
        torch.linalg.vector_norm(p.grad.detach().float())
        for p in module.parameters()
        if p.grad is not None
    ]
    if not norms:
        return None
    return torch.linalg.vector_norm(torch.stack(norms))


class GradNormMonitor(pl.Callback):
    """Log the gradient norm just before each optimizer step that Lightning will log.

    It runs in ``on_before_optimizer_step``: after backward (and, under DDP, after the
    gradients are averaged over ranks), before gradient clipping and before the decoder removes
    the gradient component parallel to its unit-norm atoms. It is computed only on the steps
    whose metrics reach the logger (every ``trainer.log_every_n_steps``), and stays on the
    device: no host sync.
    """

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not logs_step(trainer, trainer.global_step):  # global_step: finished steps
            return
        norm = global_grad_norm(pl_module)
        if norm is not None:
            pl_module.log("train/grad_norm", norm)
