"""A callback base that takes Lightning's batch-end hooks once and hands on what callbacks use.

Lightning's ``on_train_batch_end`` and ``on_validation_batch_end`` pass five or six arguments;
most callbacks need the batch and the step. Subclasses of :class:`BatchEndCallback` override
:meth:`~BatchEndCallback.after_train_batch` / :meth:`~BatchEndCallback.after_validation_batch`
instead, and all of them count steps the same way (``step`` below).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import lightning.pytorch as pl
from typing_extensions import override


class TrainBatchEnd(NamedTuple):
    """A training batch whose optimizer step has just run."""

    batch: Any
    """The local batch as the dataloader gave it."""
    outputs: Any
    """What ``training_step`` returned (a dict with ``loss``, or None when it skipped)."""
    step: int
    """0-based optimizer step just taken: ``trainer.global_step - 1`` (the ``step`` that
    :func:`~sae_lightning.cadence.logs_step` and :func:`~sae_lightning.cadence.every_n_steps`
    take)."""


class BatchEndCallback(pl.Callback):
    """Base for callbacks that act after training or validation batches.

    Override :meth:`after_train_batch` and/or :meth:`after_validation_batch`; both do nothing
    by default.
    """

    def after_train_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, end: TrainBatchEnd
    ) -> None:
        """Called after each training batch's optimizer step, on every rank."""

    def after_validation_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, dataloader_idx: int
    ) -> None:
        """Called after each validation batch (sanity checks included), on every rank."""

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        end = TrainBatchEnd(batch=batch, outputs=outputs, step=trainer.global_step - 1)
        self.after_train_batch(trainer, pl_module, end)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.after_validation_batch(trainer, pl_module, batch, dataloader_idx)
