"""Pieces the expander benchmarks share: a step timer callback and one bare training step."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch


class StepTimer(pl.Callback):
    """Wall time of every training step, from batch start to batch end (after the optimizer)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, out: Any, batch: Any, i: int
    ) -> None:
        self.times.append(time.perf_counter() - self._start)


def train_step(sae: Any, x: torch.Tensor, opt: torch.optim.Optimizer, dead: torch.Tensor) -> None:
    """One step as the module trains: MSE + AuxK, backward, the decoder's constraints, Adam.

    Nothing outlives the step, as when ``training_step`` returns.
    """
    out = sae.run(x)
    residual = x - out.x_hat.detach()
    aux = sae.sparsity.auxiliary_losses(out.pre_acts, x, residual, sae.decoder, dead)
    loss = (x - out.x_hat).pow(2).sum(dim=1).mean() + sum(aux.values())
    loss.backward()
    sae.before_optimizer_step()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sae.after_optimizer_step()
