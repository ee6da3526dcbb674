"""Shared pieces of the function-space encoders and decoders: config types, shape checks, lifting.

Everything here is about functions sampled on the periodic unit domain ``[0, 1)^d`` (``d`` = 1
or 2) on a uniform grid, as in :mod:`sae_lightning.functional`: a batch is
``(batch, channels, *grid)`` and a grid point has quadrature weight ``1 / prod(grid)``.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from sae_lightning.errors import ConfigError

Grid = Annotated[tuple[Annotated[int, Field(ge=1)], ...], Field(min_length=1, max_length=2)]
"""A grid ``(N,)`` or ``(H, W)``: points per axis of the periodic unit domain."""

Modes = Annotated[tuple[Annotated[int, Field(ge=1)], ...], Field(min_length=1, max_length=2)]
"""Fourier modes kept per grid axis: frequencies ``|k_a| < M_a``."""


def function_grid(u: Tensor, channels: int, dims: int, who: str) -> tuple[int, ...]:
    """The grid of a function batch ``u`` after checking its layout.

    Args:
        u: expected ``(batch, channels, *grid)`` with ``dims`` grid axes.
        channels: expected channel count (the SAE's ``d_in``).
        dims: expected number of grid axes.
        who: the plugin, for the message.

    Raises:
        ValueError: ``u`` is not such a batch.
    """
    if u.ndim != 2 + dims or u.shape[1] != channels:
        axes = ", ".join(f"N{a + 1}" for a in range(dims))
        raise ValueError(
            f"{who}: expected a function batch (batch, {channels}, {axes}) with {dims} grid "
            f"axes, got shape {tuple(u.shape)}; function-space SAEs take (batch, channels, "
            f"*grid) tensors (d_in = channels)"
        )
    return tuple(u.shape[2:])


def check_same_grid(grid: tuple[int, ...], expected: tuple[int, ...], who: str) -> None:
    """Refuse ``grid`` unless it is the fixed grid a flattening model was built for.

    Raises:
        ValueError: the grids differ.
    """
    if tuple(grid) != tuple(expected):
        raise ValueError(
            f"{who}: built for grid {tuple(expected)} but got grid {tuple(grid)}; a flattened-"
            f"grid SAE only runs at its training grid: resample the functions to "
            f"{tuple(expected)} (or use a neural-operator SAE such as 'fno' that runs at any "
            f"grid)"
        )


def channel_vector(v: Tensor, like: Tensor) -> Tensor:
    """A per-channel vector ``(C,)`` shaped ``(1, C, 1, ...)`` to broadcast over ``like``'s grid."""
    return v.view(1, -1, *([1] * (like.ndim - 2))).to(like.dtype)


def orthonormal_lifting(
    width: int, dim: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """A random ``(width, dim)`` matrix with orthonormal columns (``P^T P = I``), ``width >= dim``.

    Lifting by such a ``P`` is an isometry, so a lifted model starts as exactly the unlifted model
    it factors (see :class:`sae_neural_operator.encoders.LiftedEncoder`).
    """
    a = torch.randn(width, dim, generator=generator)
    q, r = torch.linalg.qr(a)  # (width, dim), (dim, dim)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # unique, Haar-distributed


def check_lifting_width(width: int, minimum: int, field: str = "lifting_width") -> None:
    """Reject a lifting narrower than what it lifts.

    Raises:
        ConfigError: ``width < minimum``.
    """
    if width < minimum:
        raise ConfigError(
            field,
            f"is {width}, smaller than the dimension it lifts ({minimum}); a lifting must not "
            "lose information",
            f"set {field} >= {minimum} (or leave it unset for 2x)",
        )


def lifting_width(requested: int | None, minimum: int, inherited: int | None = None) -> int:
    """The width ``h`` of a lifting of ``minimum`` dimensions: ``requested``, else ``inherited``
    (a decoder takes its encoder's), else ``2 * minimum``.

    Raises:
        ConfigError: the width is smaller than ``minimum``.
    """
    width = requested or inherited or 2 * minimum
    check_lifting_width(width, minimum)
    return width
