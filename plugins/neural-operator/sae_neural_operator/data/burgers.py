"""1-D viscous Burgers: ``u_t + (u^2 / 2)_x = nu u_xx`` on the periodic domain ``[0, 1)``.

**Initial condition.** A Gaussian random field close to Li et al. 2021's
``N(0, 625 (-Delta + 25 I)^{-2})``: the band-limited Fourier series
``u_0(x) = sum_{1 <= k <= K} sigma_k (xi_k cos(2 pi k x) + zeta_k sin(2 pi k x))`` with
``xi_k, zeta_k ~ N(0, 1)`` and ``sigma_k = sqrt(2) * amplitude * ((2 pi k)^2 + tau^2)^(-alpha/2)``
(defaults ``amplitude = 25``, ``tau = 5``, ``alpha = 2``, ``K = modes = 32``). ``u_0`` is a
finite Fourier series, so it is the same function at every resolution.

**Solver.** Pseudo-spectral in space (``N`` points ``i / N``, the nonlinear term dealiased by the
2/3 rule) and ETDRK4 in time (Cox & Matthews 2002) with the phi-function coefficients computed
by contour integrals (Kassam & Trefethen 2005, 32 points), fixed step ``dt`` up to ``T``.
The linear part ``-nu (2 pi k)^2`` is integrated exactly; the ``k = 0`` mode of the nonlinear
term ``-i pi k (u^2)^`` is exactly zero, so the mean of ``u`` (the mass) is conserved to rounding.
The explicit nonlinear part needs ``dt * max|u| * k_max`` below about 2.8 (``k_max = 2 pi N / 3``
after dealiasing); since the maximum of ``|u|`` cannot grow, a larger value computed from
``u_0`` is refused with an error naming ``dt``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor

from sae_lightning.config import PluginConfig
from sae_lightning.errors import ConfigError
from sae_neural_operator.data.generator import PDEGenerator

_STABILITY = 2.8  # explicit stability bound of ETDRK4 on the imaginary axis (about 2.8)


class BurgersConfig(PluginConfig):
    """Viscous Burgers parameters (see :mod:`sae_neural_operator.data.burgers`)."""

    viscosity: float = Field(0.1, gt=0, description="nu (Li et al. 2021: 0.1)")
    final_time: float = Field(1.0, gt=0, description="T: the solution field is u(., T)")
    dt: float = Field(1e-3, gt=0, description="time step")
    modes: int = Field(32, ge=1, description="Fourier modes of the initial condition")
    amplitude: float = Field(25.0, gt=0, description="GRF amplitude (Li et al.: 625 = 25^2)")
    tau: float = Field(5.0, gt=0, description="GRF inverse length scale")
    alpha: float = Field(2.0, gt=0, description="GRF smoothness exponent")


def _wavenumbers(n: int) -> Tensor:
    """``(n // 2 + 1,)`` float64 angular wavenumbers ``2 pi k`` of an rfft of length ``n``."""
    return 2 * math.pi * torch.arange(n // 2 + 1, dtype=torch.float64)


def _dealias_mask(n: int) -> Tensor:
    """``(n // 2 + 1,)`` True on the modes kept by the 2/3 rule (``k < n / 3``)."""
    return torch.arange(n // 2 + 1) < n / 3


def etdrk4_coefficients(lin: Tensor, dt: float, points: int = 32) -> tuple[Tensor, ...]:
    """ETDRK4 coefficients ``(E, E2, Q, f1, f2, f3)`` for the diagonal linear operator ``lin``.

    Contour-integral evaluation of the phi functions (Kassam & Trefethen 2005), accurate also
    where ``dt * lin`` is near 0.
    """
    e, e2 = torch.exp(dt * lin), torch.exp(dt * lin / 2)
    roots = torch.exp(
        1j * math.pi * (torch.arange(1, points + 1, dtype=torch.float64) - 0.5) / points
    )
    lr = dt * lin[..., None].to(torch.complex128) + roots  # (..., points)
    q = dt * ((torch.exp(lr / 2) - 1) / lr).mean(-1).real
    f1 = dt * ((-4 - lr + torch.exp(lr) * (4 - 3 * lr + lr**2)) / lr**3).mean(-1).real
    f2 = dt * ((2 + lr + torch.exp(lr) * (-2 + lr)) / lr**3).mean(-1).real
    f3 = dt * ((-4 - 3 * lr - lr**2 + torch.exp(lr) * (4 - lr)) / lr**3).mean(-1).real
    return e, e2, q, f1, f2, f3


def solve_burgers(u0: Tensor, viscosity: float, final_time: float, dt: float) -> Tensor:
    """Integrate Burgers from ``u0 (B, N)`` (float64 point values at ``i / N``) to ``T``.

    The number of steps is ``ceil(T / dt)`` with the step shortened to land on ``T`` exactly.

    Returns:
        ``(B, N)`` float64 ``u(., T)``.

    Raises:
        ConfigError: ``dt`` violates the explicit stability bound for this ``u0``.
    """
    n = u0.shape[-1]
    steps = max(1, math.ceil(final_time / dt - 1e-9))
    h = final_time / steps
    k = _wavenumbers(n)
    k_max = float(k[_dealias_mask(n)].max()) if n > 2 else 2 * math.pi
    courant = h * float(u0.abs().max()) * k_max
    if courant > _STABILITY:
        raise ConfigError(
            "data.burgers.dt",
            f"is {dt}: dt * max|u0| * k_max = {courant:.3g} exceeds the explicit stability "
            f"bound {_STABILITY} at {n} points",
            f"use dt <= {dt * _STABILITY / courant:.3g} or a coarser solve resolution",
        )
    lin = -viscosity * k**2
    e, e2, q, f1, f2, f3 = etdrk4_coefficients(lin, h)
    g = -0.5j * k * _dealias_mask(n)  # N(v) = g * fft(ifft(v)^2): -(u^2/2)_x, dealiased

    def nonlinear(v: Tensor) -> Tensor:
        return g * torch.fft.rfft(torch.fft.irfft(v, n=n) ** 2)

    v = torch.fft.rfft(u0.double())
    for _ in range(steps):
        nv = nonlinear(v)
        a = e2 * v + q * nv
        na = nonlinear(a)
        b = e2 * v + q * na
        nb = nonlinear(b)
        c = e2 * a + q * (2 * nb - nv)
        nc = nonlinear(c)
        v = e * v + f1 * nv + 2 * f2 * (na + nb) + f3 * nc
    return torch.fft.irfft(v, n=n)


class Burgers(PDEGenerator[BurgersConfig]):
    """Generates Burgers samples: ``noise`` draws one sample's randomness, ``solve`` renders."""

    dims = 1

    def noise(self, generator: torch.Generator) -> Tensor:
        """``(2, modes)`` float64 standard normal cosine/sine coefficients of ``u_0``."""
        return torch.randn(2, self.config.modes, generator=generator, dtype=torch.float64)

    def initial(self, xi: Tensor, n: int) -> Tensor:
        """``(B, n)`` the initial condition of coefficients ``xi (B, 2, K)`` at ``i / n``."""
        c = self.config
        k = torch.arange(1, c.modes + 1, dtype=torch.float64)
        sigma = math.sqrt(2) * c.amplitude * ((2 * math.pi * k) ** 2 + c.tau**2) ** (-c.alpha / 2)
        phase = 2 * math.pi * torch.arange(n, dtype=torch.float64)[:, None] / n * k  # (n, K)
        return (xi[:, 0] * sigma) @ torch.cos(phase).T + (xi[:, 1] * sigma) @ torch.sin(phase).T

    def solve(self, xi: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """``(u_0, u_T)``, each ``(B, n)`` float64."""
        c = self.config
        u0 = self.initial(xi, n)
        return u0, solve_burgers(u0, c.viscosity, c.final_time, c.dt)
