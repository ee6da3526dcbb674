"""Logs metrics that need the data's ground truth (e.g. dictionary recovery on synthetic data).

A data module offers ground truth by declaring the methods of :class:`ReferenceMetricsData` or
:class:`ReferenceAtomsData`; callbacks ask only through these protocols.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from sae_lightning.multi import MultiSAEModule
from sae_lightning.protocols import TrainsSAEs


@runtime_checkable
class ReferenceMetricsData(Protocol):
    """A data module that can score an SAE against its ground truth."""

    def reference_metrics(self, sae: Any) -> dict[str, float]:
        """``{"mmcs": ..., ...}`` for ``sae`` (logged under ``val/``)."""
        ...


@runtime_checkable
class ReferenceAtomsData(Protocol):
    """A data module with a known dictionary (drawn by the ``AtomImages`` callback)."""

    def reference_atoms(self) -> Tensor | None:
        """The ``(n_atoms, d_in)`` ground-truth dictionary, or None when there is none."""
        ...


class ReferenceMetrics(pl.Callback):
    """At each validation end, log ``datamodule.reference_metrics(sae)`` under ``val/``.

    A multi-SAE module's members are each logged under ``<name>/val/``.

    Any DataModule can opt in by defining ``reference_metrics(sae) -> dict[str, float]``
    (:class:`ReferenceMetricsData`);
    the synthetic DataModule reports ``mmcs`` and ``recovered_frac``.
    """

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, ReferenceMetricsData) or trainer.sanity_checking:
            return
        members = pl_module.members() if isinstance(pl_module, TrainsSAEs) else {}
        values: dict[str, float] = {}
        for name, member in members.items():
            prefix = f"{name}/" if name else ""
            for key, value in datamodule.reference_metrics(member.sae).items():
                values[f"{prefix}val/{key}"] = float(value)
        if isinstance(pl_module, MultiSAEModule):  # SAEs spread over processes are gathered
            pl_module.log_per_sae(values)
            return
        for key, value in values.items():
            # Equal on every rank (computed from the same weights), so the sync is a no-op
            # that keeps Lightning from warning about unsynchronised epoch-level metrics.
            pl_module.log(key, value, sync_dist=True)
