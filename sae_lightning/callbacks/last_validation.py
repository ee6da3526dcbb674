"""Remembers the metrics of the last validation in ``fit``, so the run's end need not repeat it.

When ``val_check_interval`` divides ``max_steps``, the last training step is already validated;
validating again at the end would cost another pass over the validation data (and, with the
``e2e_kl`` callback, another pass of the language model) for the same numbers.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override


def is_training_metric(key: str) -> bool:
    """``train/...`` or a member's ``<name>/train/...``: logged by training, not validation."""
    return key.startswith("train/") or "/train/" in key


class LastValidation(pl.Callback):
    """Record ``(global_step, metrics)`` at the end of every validation during ``fit``."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.metrics: dict[str, float] = {}

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self.step = trainer.global_step
        self.metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if not is_training_metric(k)
        }

    def at(self, step: int) -> dict[str, float] | None:
        """The metrics of the validation run at ``step``, or None when there was none."""
        return dict(self.metrics) if self.step == step and self.metrics else None
