"""The training progress bar: steps out of ``max_steps`` and the logged metrics, read on
logging steps only.

Lightning's bars read every ``prog_bar=True`` value on the host after every step (a wait for the
device each step). This bar instead shows a few of the values the logger receives and refreshes
them when the logger does (every ``trainer.log_every_n_steps``), so between logging steps it
reads nothing from the device.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import get_standard_metrics
from typing_extensions import override

from sae_lightning.cadence import logs_step

SHOWN = {
    "train/loss": "loss",
    "train/loss_sum": "loss",
    "train/l0": "l0",
    "throughput/tokens_per_s": "tokens/s",
}
"""Logged keys the bar shows, with their label."""


class LoggedMetricsBar(RichProgressBar):
    """Rich progress bar of a step-bounded run, showing :data:`SHOWN` as last logged.

    Args:
        kwargs: :class:`~lightning.pytorch.callbacks.RichProgressBar` arguments (default
            ``leave=True``: the bar stays on screen after training).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{"leave": True, **kwargs})
        self._shown: dict[str, Any] = {}
        self._read_at = -1  # the step whose values are shown

    @property
    @override
    def total_train_batches(self) -> int | float:
        """``max_steps`` for a stream without epochs (Lightning gives infinity)."""
        total = super().total_train_batches
        max_steps = self.trainer.max_steps
        if math.isinf(total) and max_steps > 0:
            return max_steps
        return total

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        steps_only = trainer.max_epochs is None or trainer.max_epochs < 1  # not "Epoch 0/-2"
        if steps_only and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, description="Training")

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The version and :data:`SHOWN`, as logged on the last logging step (no device read
        on other steps)."""
        step = trainer.global_step - 1
        if step != self._read_at and logs_step(trainer, step):
            self._read_at = step
            logged = trainer.logged_metrics  # tensors; read below, on logging steps only
            self._shown = {
                label: float(logged[key]) for key, label in SHOWN.items() if key in logged
            }
        return {**get_standard_metrics(trainer), **self._shown}
