"""Function-valued batches: samples of functions on a uniform periodic grid.

A function batch is a tensor ``(batch, channels, *grid)``: each sample is a function
``u: [0, 1)^d -> R^channels`` sampled at the points ``i / N`` of each axis. Integrals are taken by
the rectangle rule with weight ``1 / prod(grid)`` per point (the domain has volume 1), which is
exact for band-limited periodic functions resolved by the grid. Quantities built on these
integrals (L2 norms, relative errors, mean penalties) therefore agree across resolutions, which
is what lets one function-space SAE be trained at one grid and evaluated at another.

Vector batches ``(batch, d_in)`` are the special case with no grid; every helper here accepts
both, so the module can use one code path.
"""

from __future__ import annotations

import math

from torch import Tensor


def is_function_batch(x: Tensor) -> bool:
    """True for ``(batch, channels, *grid)`` tensors, False for ``(batch, d_in)``."""
    return x.ndim > 2


def grid_shape(x: Tensor) -> tuple[int, ...]:
    """The grid of a function batch (``()`` for a vector batch)."""
    return tuple(x.shape[2:])


def quadrature_weight(grid: tuple[int, ...]) -> float:
    """Weight of one grid point in an integral over the unit domain: ``1 / prod(grid)``."""
    return 1.0 / math.prod(grid) if grid else 1.0


def as_points(x: Tensor) -> Tensor:
    """``(batch, channels, *grid) -> (batch * prod(grid), channels)``; vectors unchanged.

    Each grid point becomes one row, the way each token of a language model is one row: this is
    the view in which point-wise statistics (FVU, MSE, point-wise sparsity) are computed.
    """
    if x.ndim <= 2:
        return x
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def from_points(rows: Tensor, batch: int, grid: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`as_points`: ``(batch * prod(grid), c) -> (batch, c, *grid)``."""
    if not grid:
        return rows
    return rows.reshape(batch, *grid, rows.shape[-1]).movedim(-1, 1)


def l2_norm_sq(u: Tensor) -> Tensor:
    """``(batch,)`` squared L2 norms ``int |u|^2`` (sum over channels, quadrature over the grid)."""
    return u.pow(2).flatten(1).sum(dim=1) * quadrature_weight(grid_shape(u))


def inner_products(a: Tensor, b: Tensor) -> Tensor:
    """``(n_a, n_b)`` L2 inner products ``<a_i, b_j>`` of two stacks of functions on one grid.

    Args:
        a: ``(n_a, channels, *grid)``.
        b: ``(n_b, channels, *grid)``, the same channels and grid.

    Raises:
        ValueError: the stacks are sampled on different grids or have different channels.
    """
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"inner_products needs functions on the same grid and channels, got "
            f"{tuple(a.shape[1:])} and {tuple(b.shape[1:])}; render both at one resolution"
        )
    return (a.flatten(1) @ b.flatten(1).T) * quadrature_weight(grid_shape(a))


def relative_l2(u: Tensor, u_hat: Tensor, eps: float = 1e-12) -> Tensor:
    """``(batch,)`` relative L2 errors ``||u - u_hat|| / ||u||``."""
    return relative_l2_of_residual(u, u - u_hat, eps)


def relative_l2_of_residual(u: Tensor, residual: Tensor, eps: float = 1e-12) -> Tensor:
    """:func:`relative_l2` from ``u`` and an already computed ``u - u_hat``."""
    return (l2_norm_sq(residual) / l2_norm_sq(u).clamp_min(eps)).sqrt()
