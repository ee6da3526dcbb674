"""Logs metrics that need the data's ground truth (e.g. dictionary recovery on synthetic data)."""

from __future__ import annotations

import lightning.pytorch as pl
from typing_extensions import override


class ReferenceMetrics(pl.Callback):
    """At each validation end, log ``datamodule.reference_metrics(sae)`` under ``val/``.

    Any DataModule can opt in by defining ``reference_metrics(sae) -> dict[str, float]``;
    the synthetic DataModule reports ``mmcs`` and ``recovered_frac``.
    """

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        report = getattr(datamodule, "reference_metrics", None)
        if report is None or trainer.sanity_checking:
            return
        for key, value in report(pl_module.sae).items():
            pl_module.log(f"val/{key}", float(value))
