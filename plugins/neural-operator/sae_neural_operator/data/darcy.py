"""2-D Darcy flow: ``-div(a(x) grad u(x)) = f`` on the unit square, ``u = 0`` on the boundary.

**Permeability.** ``a`` comes from a Gaussian random field on ``[0, 1]^2`` in the cosine
(Neumann) basis, as in Li et al. 2021's ``GRF.m``::

    psi(x, y) = sum_{0 <= k1, k2 < K, k != 0} xi_k tau^(alpha - 1) (pi^2 |k|^2 + tau^2)^(-alpha/2)
                cos(pi k1 x) cos(pi k2 y),       xi_k ~ N(0, 1)

(``K = modes``, defaults ``alpha = 2``, ``tau = 3``). ``coefficient: piecewise`` thresholds it,
``a = high`` (12) where ``psi >= 0`` and ``low`` (3) elsewhere (Li et al.'s values);
``coefficient: lognormal`` takes ``a = exp(scale * psi)``. ``psi`` is a finite cosine series, so
``a`` at any grid is the same continuous field sampled there.

**Grid.** ``N x N`` vertices ``(i / N, j / N)``, ``0 <= i, j < N``, spacing ``h = 1 / N``: the
periodic-grid convention of :mod:`sae_lightning.functional`. Row and column 0 lie on the
boundary ``x = 0`` / ``y = 0`` (``u = 0``); the boundary at ``1`` is the periodic image of 0, so
the zero-extended solution is a continuous periodic function. The unknowns are the
``(N - 1)^2`` interior vertices, and subsampling a ``2N`` solution by 2 gives the ``N`` grid.

**Scheme.** The standard 5-point finite-volume scheme: with the face coefficients
``a_{i+1/2,j}`` the flux balance at vertex ``(i, j)`` reads::

    -[a_{i+1/2,j}(u_{i+1,j} - u_{ij}) - a_{i-1/2,j}(u_{ij} - u_{i-1,j})
      + a_{i,j+1/2}(u_{i,j+1} - u_{ij}) - a_{i,j-1/2}(u_{ij} - u_{i,j-1})] / h^2 = f_{ij}

Face coefficients average the two vertex values: ``harmonic`` (default)
``2 a_P a_Q / (a_P + a_Q)``, the series conductance of two half-cells, which keeps the flux
continuous across a jump of ``a``; or ``arithmetic`` ``(a_P + a_Q) / 2``. For smooth ``a`` the
scheme is second-order accurate; across the jumps of a piecewise-constant ``a`` that the grid
does not align with it is first order. The sparse system (symmetric positive definite) is
solved by a direct sparse LU (``scipy.sparse.linalg.spsolve``) in float64.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import Field
from scipy.sparse.linalg import spsolve
from torch import Tensor

from sae_lightning.config import PluginConfig
from sae_neural_operator.data.generator import PDEGenerator

FaceAverage = Literal["harmonic", "arithmetic"]


class DarcyConfig(PluginConfig):
    """Darcy flow parameters (see :mod:`sae_neural_operator.data.darcy`)."""

    coefficient: Literal["piecewise", "lognormal"] = Field(
        "piecewise", description="permeability: threshold of a GRF, or exp(scale * GRF)"
    )
    alpha: float = Field(2.0, gt=0, description="GRF smoothness exponent")
    tau: float = Field(3.0, gt=0, description="GRF inverse length scale")
    modes: int = Field(32, ge=2, description="GRF cosine modes per axis")
    high: float = Field(12.0, gt=0, description="piecewise: a where the GRF is >= 0")
    low: float = Field(3.0, gt=0, description="piecewise: a where the GRF is < 0")
    scale: float = Field(1.0, gt=0, description="lognormal: a = exp(scale * GRF)")
    forcing: float = Field(1.0, description="constant source term f")
    face_average: FaceAverage = Field(
        "harmonic", description="face coefficient from two vertex values: harmonic or arithmetic"
    )


class Darcy(PDEGenerator[DarcyConfig]):
    """Generates Darcy samples: ``noise`` draws one sample's randomness, ``solve`` renders."""

    dims = 2

    def noise(self, generator: torch.Generator) -> Tensor:
        """``(modes, modes)`` float64 standard normal GRF coefficients of one sample."""
        k = self.config.modes
        return torch.randn(k, k, generator=generator, dtype=torch.float64)

    def grf(self, xi: Tensor, n: int) -> Tensor:
        """``(B, n + 1, n + 1)`` the GRF of coefficients ``xi (B, K, K)`` at ``(i / n, j / n)``,
        ``0 <= i, j <= n`` (both boundaries included)."""
        c = self.config
        k = torch.arange(c.modes, dtype=torch.float64)
        k2 = k[:, None] ** 2 + k[None, :] ** 2
        coef = c.tau ** (c.alpha - 1) * (math.pi**2 * k2 + c.tau**2) ** (-c.alpha / 2)
        coef[0, 0] = 0.0  # mean-zero field
        x = torch.arange(n + 1, dtype=torch.float64)[:, None] / n
        basis = torch.cos(math.pi * x * k)  # (n + 1, K)
        return basis @ (xi * coef) @ basis.T  # sum_k1,k2 phi_k1(x) coef xi phi_k2(y)

    def coefficient(self, xi: Tensor, n: int) -> Tensor:
        """``(B, n + 1, n + 1)`` permeability ``a`` at the vertices, boundaries included."""
        c = self.config
        psi = self.grf(xi, n)
        if c.coefficient == "lognormal":
            return torch.exp(c.scale * psi)
        return torch.where(psi >= 0, c.high, c.low).to(torch.float64)

    def solve(self, xi: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """``(a, u)``, each ``(B, n, n)`` float64 at ``(i / n, j / n)``, ``0 <= i, j < n``."""
        a = self.coefficient(xi, n)
        f = torch.full_like(a, self.config.forcing)
        u = solve_darcy(a, f, self.config.face_average)
        return a[:, :n, :n], u[:, :n, :n]


def face_coefficients(a: Tensor, average: FaceAverage) -> tuple[Tensor, Tensor]:
    """Coefficients on the faces between neighbouring vertices.

    Args:
        a: ``(..., N + 1, N + 1)`` vertex values, boundaries included.
        average: harmonic or arithmetic mean of the two vertices.

    Returns:
        ``ax (..., N, N + 1)`` with ``ax[i, j] = a_{i+1/2, j}`` and ``ay (..., N + 1, N)`` with
        ``ay[i, j] = a_{i, j+1/2}``.
    """
    pairs = ((a[..., :-1, :], a[..., 1:, :]), (a[..., :, :-1], a[..., :, 1:]))
    if average == "harmonic":
        return tuple(2 * p * q / (p + q) for p, q in pairs)  # type: ignore[return-value]
    return tuple((p + q) / 2 for p, q in pairs)  # type: ignore[return-value]


def darcy_matrix(a: Tensor, average: FaceAverage = "harmonic") -> sp.csr_matrix:
    """The system matrix (times ``h^2``) of one sample ``a (N + 1, N + 1)``.

    The ``(N - 1)^2`` unknowns are the interior vertices ``1 <= i, j <= N - 1``, row-major;
    boundary neighbours contribute nothing (``u = 0`` there).
    """
    ax, ay = (t.numpy() for t in face_coefficients(a.double(), average))
    m = a.shape[-1] - 2  # interior vertices per axis
    idx = np.arange(m * m).reshape(m, m)
    inner = slice(1, m + 1)
    # faces around interior vertex (i, j): east ax[i, j], west ax[i-1, j], north/south ay
    east, west = ax[1 : m + 1, inner], ax[0:m, inner]
    north, south = ay[inner, 1 : m + 1], ay[inner, 0:m]
    rows, cols, vals = [idx.ravel()], [idx.ravel()], [(east + west + north + south).ravel()]
    i, j = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    for coeff, di, dj in ((east, 1, 0), (west, -1, 0), (north, 0, 1), (south, 0, -1)):
        ok = (i + di >= 0) & (i + di < m) & (j + dj >= 0) & (j + dj < m)
        rows.append(idx[i[ok], j[ok]])
        cols.append(idx[i[ok] + di, j[ok] + dj])
        vals.append(-coeff[ok])
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(m * m, m * m)
    )


def solve_darcy(a: Tensor, f: Tensor, average: FaceAverage = "harmonic") -> Tensor:
    """Solve the 5-point scheme for every sample.

    Args:
        a: ``(B, N + 1, N + 1)`` vertex permeabilities (positive), boundaries included.
        f: ``(B, N + 1, N + 1)`` source at the vertices (boundary values unused).
        average: face averaging of ``a``.

    Returns:
        ``(B, N + 1, N + 1)`` float64 solution, zero on the boundary.
    """
    batch, m = a.shape[0], a.shape[-1] - 2
    h2 = 1.0 / (m + 1) ** 2
    u = torch.zeros(batch, m + 2, m + 2, dtype=torch.float64)
    for b in range(batch):
        matrix = darcy_matrix(a[b], average)
        rhs = (f[b, 1:-1, 1:-1].double().numpy() * h2).ravel()
        solution = spsolve(matrix.tocsc(), rhs, permc_spec="MMD_AT_PLUS_A")  # symmetric ordering
        u[b, 1:-1, 1:-1] = torch.from_numpy(solution).reshape(m, m)
    return u


def darcy_residual(a: Tensor, u: Tensor, f: Tensor, average: FaceAverage = "harmonic") -> Tensor:
    """``(B,)`` relative residual ``||L_h u - f|| / ||f||`` over the interior vertices.

    Applies the stencil with array slices, independently of :func:`darcy_matrix`, so it checks
    the assembly as well as the solve. Arguments are ``(B, N + 1, N + 1)`` as for
    :func:`solve_darcy`.
    """
    n = a.shape[-1] - 1
    ax, ay = face_coefficients(a.double(), average)
    u = u.double()
    c = u[..., 1:-1, 1:-1]
    flux = (
        ax[..., 1:, 1:-1] * (u[..., 2:, 1:-1] - c)
        - ax[..., :-1, 1:-1] * (c - u[..., :-2, 1:-1])
        + ay[..., 1:-1, 1:] * (u[..., 1:-1, 2:] - c)
        - ay[..., 1:-1, :-1] * (c - u[..., 1:-1, :-2])
    )
    res = (-flux * n**2 - f[..., 1:-1, 1:-1]).flatten(1)
    return res.norm(dim=1) / f[..., 1:-1, 1:-1].flatten(1).norm(dim=1)
