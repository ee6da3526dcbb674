"""The trainer's TensorBoard loggers, for the callbacks that draw into TensorBoard."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger


def tensorboard_loggers(trainer: pl.Trainer) -> list[TensorBoardLogger]:
    """The trainer's TensorBoard loggers (none when logging is off)."""
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
