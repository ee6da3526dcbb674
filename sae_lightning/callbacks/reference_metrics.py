"""Logs metrics that need the data's ground truth (e.g. dictionary recovery on synthetic data)."""

from __future__ import annotations

import lightning.pytorch as pl
from typing_extensions import override


class ReferenceMetrics(pl.Callback):
    """At each validation end, log ``datamodule.reference_metrics(sae)`` under ``val/``.

    A multi-SAE module's members are each logged under ``<name>/val/``.

    Any DataModule can opt in by defining ``reference_metrics(sae) -> dict[str, float]``;
    the synthetic DataModule reports ``mmcs`` and ``recovered_frac``.
    """

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        report = getattr(datamodule, "reference_metrics", None)
        if report is None or trainer.sanity_checking:
            return
        members = pl_module.members() if hasattr(pl_module, "members") else {"": pl_module}
        for name, member in members.items():
            prefix = f"{name}/" if name else ""
            for key, value in report(member.sae).items():
                # Equal on every rank (computed from the same weights), so the sync is a no-op
                # that keeps Lightning from warning about unsynchronised epoch-level metrics.
                pl_module.log(f"{prefix}val/{key}", float(value), sync_dist=True)
