"""2-D incompressible Navier-Stokes in vorticity form on the periodic domain ``[0, 1)^2``::

    w_t + v . grad w = nu Delta w + f,    v = (psi_y, -psi_x),    -Delta psi = w

the setting of Li et al. 2021's Navier-Stokes data (forcing
``f(x, y) = 0.1 (sin(2 pi (x + y)) + cos(2 pi (x + y)))``).

**Initial vorticity.** Li et al.'s Gaussian random field ``N(0, 7^{3/2} (-Delta + 49 I)^{-2.5})``
truncated to the frequencies ``|k|_inf <= modes``: ``w_0 = sum_k c_k exp(2 pi i k.x)`` with
Hermitian ``c_k`` whose real and imaginary parts have standard deviation
``sigma (4 pi^2 |k|^2 + tau^2)^(-alpha/2)`` (``sigma = tau^{(2 alpha - 2)/2}``, ``tau = 7``,
``alpha = 2.5``; the variance of Li et al.'s field, which takes the real part of a
non-Hermitian series), no mean. A finite Fourier series,
so it is the same function at every resolution (evaluated exactly as in
:mod:`sae_neural_operator.data.functions`).

**Solver.** Pseudo-spectral (``N x N`` points ``(i / N, j / N)``, the advection term dealiased by
the 2/3 rule), fixed step ``dt``. Viscosity is treated by Crank-Nicolson and advection and forcing
explicitly by Heun's method (the predictor is Li et al.'s semi-implicit Euler step; the corrector
averages the two advection terms), second order in time::

    w* = [(1 - dt nu L / 2) w^n + dt (f - A(w^n))] / (1 + dt nu L / 2)
    w^{n+1} = [(1 - dt nu L / 2) w^n + dt (f - (A(w^n) + A(w*)) / 2)] / (1 + dt nu L / 2)

with ``L = 4 pi^2 |k|^2`` and ``A(w) = v . grad w``. The velocity CFL number
``dt * max|v| * N`` is checked on ``w_0`` (a rough guide: the flow can speed up) and refused
above 1 with an error naming ``dt``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor

from sae_lightning.config import PluginConfig
from sae_lightning.errors import ConfigError
from sae_neural_operator.data.functions import fourier_on_grid, frequencies
from sae_neural_operator.data.generator import PDEGenerator


class NavierStokesConfig(PluginConfig):
    """Navier-Stokes vorticity parameters (see :mod:`sae_neural_operator.data.navier_stokes`)."""

    viscosity: float = Field(1e-3, gt=0, description="nu")
    final_time: float = Field(10.0, gt=0, description="T: the solution field is w(., T)")
    dt: float = Field(0.02, gt=0, description="time step")
    modes: int = Field(8, ge=1, description="Fourier modes per axis of the initial vorticity")
    tau: float = Field(7.0, gt=0, description="GRF inverse length scale")
    alpha: float = Field(2.5, gt=0, description="GRF smoothness exponent")
    forcing: bool = Field(True, description="apply Li et al.'s forcing 0.1 (sin + cos)(2 pi (x+y))")


def solve_navier_stokes(
    w0: Tensor, viscosity: float, final_time: float, dt: float, forcing: bool = True
) -> Tensor:
    """Integrate from the vorticity ``w0 (B, N, N)`` (float64, points ``i / N``) to ``T``.

    The number of steps is ``ceil(T / dt)``, the step shortened to land on ``T`` exactly.

    Returns:
        ``(B, N, N)`` float64 vorticity at ``T``.

    Raises:
        ConfigError: the CFL number of ``w0`` exceeds 1 for this ``dt``.
    """
    n = w0.shape[-1]
    steps = max(1, math.ceil(final_time / dt - 1e-9))
    h = final_time / steps
    kx = torch.fft.fftfreq(n, 1 / n, dtype=torch.float64)[:, None]  # (n, 1) integer freqs
    ky = torch.fft.rfftfreq(n, 1 / n, dtype=torch.float64)[None, :]  # (1, n // 2 + 1)
    lap = 4 * math.pi**2 * (kx**2 + ky**2)  # -Laplacian symbol
    inv_lap = torch.where(lap > 0, 1 / lap.clamp_min(1e-30), torch.zeros_like(lap))
    keep = (kx.abs() < n / 3) & (ky.abs() < n / 3)  # 2/3 rule
    dx, dy = 2j * math.pi * kx, 2j * math.pi * ky
    x = torch.arange(n, dtype=torch.float64) / n
    f_h = torch.zeros(n, n // 2 + 1, dtype=torch.complex128)
    if forcing:
        s = x[:, None] + x[None, :]
        f = 0.1 * (torch.sin(2 * math.pi * s) + torch.cos(2 * math.pi * s))
        f_h = torch.fft.rfft2(f)

    def velocity(w_h: Tensor) -> tuple[Tensor, Tensor]:
        psi_h = w_h * inv_lap
        return torch.fft.irfft2(dy * psi_h, s=(n, n)), torch.fft.irfft2(-dx * psi_h, s=(n, n))

    def advection(w_h: Tensor) -> Tensor:
        vx, vy = velocity(w_h)
        wx = torch.fft.irfft2(dx * w_h, s=(n, n))
        wy = torch.fft.irfft2(dy * w_h, s=(n, n))
        return torch.fft.rfft2(vx * wx + vy * wy) * keep

    w_h = torch.fft.rfft2(w0.double())
    vx, vy = velocity(w_h)
    courant = h * float(torch.maximum(vx.abs().max(), vy.abs().max())) * n
    if courant > 1:
        raise ConfigError(
            "data.navier_stokes.dt",
            f"is {dt}: the CFL number dt * max|v| * N of the initial flow is {courant:.3g} at "
            f"{n} points, over 1",
            f"use dt <= {dt / courant:.3g} or a coarser solve resolution",
        )
    implicit = 1 + 0.5 * h * viscosity * lap
    explicit = 1 - 0.5 * h * viscosity * lap
    for _ in range(steps):
        a0 = advection(w_h)
        pred = (explicit * w_h + h * (f_h - a0)) / implicit
        w_h = (explicit * w_h + h * (f_h - 0.5 * (a0 + advection(pred)))) / implicit
    return torch.fft.irfft2(w_h, s=(n, n))


class NavierStokes(PDEGenerator[NavierStokesConfig]):
    """Generates vorticity samples: ``noise`` draws one sample's randomness, ``solve`` renders."""

    dims = 2

    def __init__(self, config: NavierStokesConfig) -> None:
        super().__init__(config)
        self.freqs = frequencies(config.modes, 2)  # (F, 2), Hermitian pairs

    def noise(self, generator: torch.Generator) -> Tensor:
        """``(2, F / 2)`` float64 standard normal real/imaginary parts of the half spectrum."""
        return torch.randn(2, len(self.freqs) // 2, generator=generator, dtype=torch.float64)

    def initial(self, xi: Tensor, n: int) -> Tensor:
        """``(B, n, n)`` initial vorticity of coefficients ``xi (B, 2, F / 2)`` at ``i / n``."""
        c = self.config
        half = self.freqs[: len(self.freqs) // 2].double()
        sigma = c.tau ** ((2 * c.alpha - 2) / 2)
        std = sigma * (4 * math.pi**2 * half.pow(2).sum(-1) + c.tau**2) ** (-c.alpha / 2)
        coeffs = torch.complex(xi[:, 0], xi[:, 1]) * std
        return fourier_on_grid(torch.cat([coeffs, coeffs.conj()], -1), self.freqs, (n, n))

    def solve(self, xi: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """``(w_0, w_T)``, each ``(B, n, n)`` float64."""
        c = self.config
        w0 = self.initial(xi, n)
        return w0, solve_navier_stokes(w0, c.viscosity, c.final_time, c.dt, c.forcing)
