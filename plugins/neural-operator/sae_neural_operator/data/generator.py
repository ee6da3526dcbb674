"""What every PDE sample generator of ``pde_fields`` implements (Darcy, Burgers, Navier-Stokes)."""

from __future__ import annotations

from typing import ClassVar, Generic, TypeVar

import torch
from torch import Tensor

from sae_lightning.config import PluginConfig

ConfigT = TypeVar("ConfigT", bound=PluginConfig)


class PDEGenerator(Generic[ConfigT]):
    """A PDE whose samples are an input field and its solution, rendered at any resolution.

    :meth:`noise` draws one sample's randomness and :meth:`solve` renders a batch of it on a
    grid of ``n`` points per axis, so a sample is the same function at every resolution.
    """

    dims: ClassVar[int]
    """Spatial dimensions of both fields (1 or 2)."""
    fields: ClassVar[tuple[str, str]] = ("input", "solution")
    """Names of the two fields :meth:`solve` returns, in order."""

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    def noise(self, generator: torch.Generator) -> Tensor:  # pragma: no cover - protocol
        """One sample's randomness, float64, drawn from ``generator`` only."""
        raise NotImplementedError

    def solve(self, xi: Tensor, n: int) -> tuple[Tensor, Tensor]:  # pragma: no cover - protocol
        """``(input, solution)`` of the batch of noises ``xi``, each ``(B, *[n] * dims)``."""
        raise NotImplementedError
