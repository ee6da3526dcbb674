"""What the runner and the callbacks ask of the trained module and of the data module.

Declared protocols, checked with ``isinstance``, so no caller probes for an attribute: a module
that trains SAEs (:class:`TrainsSAEs`), a data module that knows its width
(:class:`DeclaresWidth`) or scales its activations (:class:`ScalesInputs`, or per channel
:class:`ScalesChannels`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import lightning.pytorch as pl

if TYPE_CHECKING:
    from torch import Tensor

    from sae_lightning.module import SAEModule


@runtime_checkable
class TrainsSAEs(Protocol):
    """What the runner and the callbacks need of a module that trains SAEs
    (:class:`SAEModule`, the e2e module and :class:`~sae_lightning.multi.MultiSAEModule`)."""

    takes_token_batches: bool
    """Whether its training batches are token ids rather than activations."""

    def members(self) -> dict[str, SAEModule]:
        """The SAEs it trains, by log prefix (``""`` for a single-SAE module)."""
        ...

    def configure_data_module(self, datamodule: pl.LightningDataModule) -> None:
        """Adapt the data module to its training batches before the data's setup."""
        ...


@runtime_checkable
class DeclaresWidth(Protocol):
    """A data module that knows the width of its activations before any batch."""

    @property
    def d_in(self) -> int: ...


@runtime_checkable
class ScalesInputs(Protocol):
    """A data module that multiplies activations by ``scale`` (normalisation); the export
    folds it into the SAE, which then takes raw activations."""

    @property
    def scale(self) -> float: ...


@runtime_checkable
class ScalesChannels(Protocol):
    """A data module that multiplies each input channel by its own factor (``(C,)``, None
    before ``setup``); the export records them in the SAE, which then takes raw inputs."""

    @property
    def channel_scale(self) -> Tensor | None: ...
