"""Training throughput in tokens (rows) and samples per second, shown on the progress bar."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from sae_lightning.cadence import logs_step
from sae_lightning.callbacks.batch_end import BatchEndCallback, TrainBatchEnd


def batch_sizes(batch: Any) -> tuple[int, int]:
    """``(tokens, samples)`` in one local batch: rows of activations and leading items.

    A ``(batch, d_in)`` tensor has ``batch`` of each; a ``(batch, seq, d_in)`` one has
    ``batch * seq`` tokens in ``batch`` samples.
    """
    x = batch[0] if isinstance(batch, tuple | list) else batch
    if not isinstance(x, Tensor) or x.dim() == 0:
        return 0, 0
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return tokens, int(x.shape[0])


class ThroughputMonitor(BatchEndCallback):
    """Log ``throughput/tokens_per_s`` (shown on the progress bar) and ``throughput/samples_per_s``.

    Wall-clock rates over the last ``window`` training batches of all ranks together (data
    loading, forward, backward and optimizer step included); the window restarts after each
    validation so that validation time is not counted. Nothing is read from the device.

    Args:
        window: number of batches the rate is averaged over.

    Raises:
        ValueError: ``window`` < 1.
    """

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self._ends: deque[tuple[float, int, int]] = deque(maxlen=window + 1)

    def _restart(self) -> None:
        self._ends.clear()
        self._ends.append((time.perf_counter(), 0, 0))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restart()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restart()

    @override
    def after_train_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, end: TrainBatchEnd
    ) -> None:
        tokens, samples = batch_sizes(end.batch)
        world = trainer.world_size  # every rank runs a batch of the same size
        self._ends.append((time.perf_counter(), tokens * world, samples * world))
        start = self._ends[0][0]
        elapsed = self._ends[-1][0] - start
        if elapsed <= 0 or len(self._ends) < 2:
            return
        if not logs_step(trainer, end.step):
            # Logging a Python float copies it to the device, a wait for the host: logging
            # steps only (the progress bar shows the logged value).
            return
        counted = list(self._ends)[1:]  # batches that ended after the window's start
        pl_module.log("throughput/tokens_per_s", sum(t for _, t, _ in counted) / elapsed)
        pl_module.log("throughput/samples_per_s", sum(s for _, _, s in counted) / elapsed)
