"""Logs metrics that need the data's ground truth (e.g. dictionary recovery on synthetic data)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from typing_extensions import override

from sae_lightning.protocols import TrainsSAEs


@runtime_checkable
class ReferenceData(Protocol):
    """A data module that can score an SAE against what it knows (e.g. the true atoms)."""

    def reference_metrics(self, sae: torch.nn.Module) -> dict[str, float]:
        """``{name: value}``, logged as ``val/<name>``."""
        ...


class ReferenceMetrics(pl.Callback):
    """At each validation end, log ``datamodule.reference_metrics(sae)`` under ``val/``.

    A multi-SAE module's members are each logged under ``<name>/val/``.

    Any DataModule can opt in by defining ``reference_metrics(sae) -> dict[str, float]``;
    the synthetic DataModule reports ``mmcs`` and ``recovered_frac``.
    """

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, ReferenceData) or trainer.sanity_checking:
            return
        report = datamodule.reference_metrics
        members = pl_module.members() if isinstance(pl_module, TrainsSAEs) else {}
        for name, member in members.items():
            prefix = f"{name}/" if name else ""
            for key, value in report(member.sae).items():
                # Equal on every rank (computed from the same weights), so the sync is a no-op
                # that keeps Lightning from warning about unsynchronised epoch-level metrics.
                pl_module.log(f"{prefix}val/{key}", float(value), sync_dist=True)
