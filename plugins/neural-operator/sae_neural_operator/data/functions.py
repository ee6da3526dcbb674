"""Continuous function families on the periodic unit domain, evaluated exactly on any grid.

Every function here is defined on the torus ``[0, 1)^d`` (``d`` = 1 or 2) by a closed formula,
so sampling it on a uniform grid (point ``i`` at ``i / N`` along each axis) gives the exact point
values at every resolution: the values at the points two grids share agree to rounding.

Two families of *atoms* (``C``-channel functions of unit L2 norm, ``||d||^2 = sum_c int |d_c|^2``):

- **Fourier** (:class:`FourierAtoms`): band-limited random Fourier series
  ``d_c(x) = sum_{k in K} c_{c,k} exp(2 pi i k.x)`` over the integer frequencies
  ``K = {k in Z^d : 1 <= |k|_inf <= K_max}`` (no mean), Hermitian (``c_{-k} = conj(c_k)``, so
  real), with complex Gaussian coefficients scaled by ``(1 + |k|^2)^(-decay / 2)``. Shifts are
  exact: ``d(x - s)`` has coefficients ``c_k exp(-2 pi i k.s)``.
- **Bumps** (:class:`BumpAtoms`): sums of ``b`` periodised Gaussians
  ``d_c(x) = sum_b w_{c,b} g_{sigma_b}(x - m_b)``, ``g_sigma(x) = sum_{n in Z^d}
  exp(-|x - n|^2 / (2 sigma^2))``: localised (centres within a few widths of each other) and
  distinct up to translation (a single Gaussian would be the same atom at every position).

Grid evaluation of a Fourier series uses the aliasing identity: adding each coefficient at index
``k mod N`` and taking an unnormalised inverse FFT gives ``sum_k c_k exp(2 pi i k n / N)`` at every
point ``n / N`` exactly, whatever ``N``. Periodised Gaussians are summed over the images
``n in {-2, ..., 2}^d``; the omitted images are smaller than ``exp(-2.25 / sigma^2)`` relative
(below 1e-24 for ``sigma <= 0.2``, the largest width accepted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

Grid = tuple[int, ...]
"""Points per axis, ``(N,)`` or ``(H, W)``."""

MAX_BUMP_WIDTH = 0.2
"""Largest Gaussian width (std) for which the periodic image sum is exact to rounding."""
_IMAGES = torch.arange(-2, 3, dtype=torch.float64)  # periodic images summed per axis


def grid_points(n: int) -> Tensor:
    """``(n,)`` float64 coordinates ``i / n`` of a periodic grid axis."""
    return torch.arange(n, dtype=torch.float64) / n


def frequencies(k_max: int, dims: int) -> Tensor:
    """``(F, dims)`` int64 frequencies with ``1 <= |k|_inf <= k_max``, ``-k`` listed with ``k``.

    The first half holds one of each ``{k, -k}`` pair and the second half the negatives in the
    same order, so a Hermitian coefficient vector is ``cat([c, c.conj()])``.
    """
    axis = torch.arange(-k_max, k_max + 1)
    mesh = torch.stack(torch.meshgrid(*([axis] * dims), indexing="ij"), -1).reshape(-1, dims)
    # keep the half-space whose first nonzero component is positive
    sign = torch.zeros(len(mesh), dtype=torch.long)
    for axis_i in range(dims - 1, -1, -1):
        col = mesh[:, axis_i]
        sign = torch.where(col != 0, col.sign(), sign)
    half = mesh[sign > 0]
    return torch.cat([half, -half])


def fourier_on_grid(coeffs: Tensor, freqs: Tensor, grid: Sequence[int]) -> Tensor:
    """Exact point values of ``sum_k coeffs[..., k] exp(2 pi i freqs[k].x)`` on ``grid``.

    Args:
        coeffs: ``(..., F)`` complex128 coefficients (Hermitian for a real function).
        freqs: ``(F, d)`` integer frequencies.
        grid: points per axis, ``len(grid) == d``.

    Returns:
        ``(..., *grid)`` float64: the real part (the imaginary part is rounding when Hermitian).
    """
    grid = tuple(grid)
    lead = coeffs.shape[:-1]
    flat = torch.zeros(*lead, math.prod(grid), dtype=torch.complex128, device=coeffs.device)
    index = torch.zeros(len(freqs), dtype=torch.long)
    for axis, n in enumerate(grid):  # row-major flat index of (k mod N) per axis
        index = index * n + torch.remainder(freqs[:, axis], n)
    flat.index_add_(-1, index.to(coeffs.device), coeffs)
    spectrum = flat.reshape(*lead, *grid)
    dims = tuple(range(-len(grid), 0))
    return torch.fft.ifftn(spectrum, dim=dims, norm="forward").real


def periodic_gaussian_1d(x: Tensor, centre: Tensor, width: Tensor) -> Tensor:
    """``sum_n exp(-(x - centre - n)^2 / (2 width^2))`` for ``x (..., N)`` and ``(...,)`` params."""
    diff = x - centre[..., None]  # (..., N)
    diff = torch.remainder(diff + 0.5, 1.0) - 0.5  # nearest image in [-0.5, 0.5)
    shifted = diff[..., None] - _IMAGES.to(x.device)  # (..., N, images)
    return torch.exp(-(shifted**2) / (2 * width[..., None, None] ** 2)).sum(-1)


def gaussian_overlap(
    centre_a: Tensor, width_a: Tensor, centre_b: Tensor, width_b: Tensor
) -> Tensor:
    """``int_{T^d} g_a(x - m_a) g_b(x - m_b) dx`` of two periodised Gaussians, in closed form.

    Centres ``(..., d)``, widths ``(...,)``; broadcasting applies. The integral of one
    periodised and one plain Gaussian over R^d is, with ``v = s_a^2 + s_b^2``,
    ``sum_n (2 pi s_a^2 s_b^2 / v)^{d/2} exp(-|m_a - m_b - n|^2 / (2 v))``.
    """
    var = width_a**2 + width_b**2  # (...,)
    d = centre_a.shape[-1]
    diff = torch.remainder(centre_a - centre_b + 0.5, 1.0) - 0.5  # (..., d)
    shifted = diff[..., None] - _IMAGES.to(diff.device)  # (..., d, images)
    per_axis = torch.exp(-(shifted**2) / (2 * var[..., None, None])).sum(-1)  # (..., d)
    scale = (2 * math.pi * width_a**2 * width_b**2 / var) ** (d / 2)
    return scale * per_axis.prod(-1)


class AtomFamily(Protocol):
    """A set of ``n_atoms`` continuous ``C``-channel atoms that can be shifted and sampled."""

    n_atoms: int
    channels: int
    dims: int

    def render(self, atom: Tensor, scale: Tensor, shift: Tensor, grid: Grid) -> Tensor:
        """``sum_s scale[b, s] * atom_{atom[b, s]}(x - shift[b, s])`` on ``grid``.

        Args:
            atom: ``(B, s)`` atom ids.
            scale: ``(B, s)`` float64 amplitudes.
            shift: ``(B, s, d)`` float64 translations in ``[0, 1)``.
            grid: points per axis.

        Returns:
            ``(B, C, *grid)`` float64.
        """
        ...

    def atoms(self, grid: Grid) -> Tensor:
        """``(n_atoms, C, *grid)`` float64: every atom at its canonical position."""
        ...


class FourierAtoms:
    """Band-limited random Fourier-series atoms of unit L2 norm (see the module docstring).

    Args:
        n_atoms: number of atoms.
        channels: channels ``C`` per atom.
        dims: 1 or 2.
        k_max: largest frequency per axis (``|k|_inf <= k_max``).
        decay: spectral decay exponent; coefficient std ``(1 + |k|^2)^(-decay / 2)``.
        generator: source of the random coefficients.
    """

    def __init__(
        self,
        n_atoms: int,
        channels: int,
        dims: int,
        k_max: int,
        decay: float,
        generator: torch.Generator,
    ) -> None:
        self.n_atoms, self.channels, self.dims = n_atoms, channels, dims
        self.freqs = frequencies(k_max, dims)  # (F, d)
        half = len(self.freqs) // 2
        k2 = self.freqs[:half].double().pow(2).sum(-1)  # (F/2,)
        std = (1 + k2) ** (-decay / 2)
        shape = (n_atoms, channels, half)
        re = torch.randn(*shape, generator=generator, dtype=torch.float64)
        im = torch.randn(*shape, generator=generator, dtype=torch.float64)
        c = torch.complex(re, im) * std
        # ||d||^2 = sum over all k of |c_k|^2 = 2 sum over the half-space (Parseval)
        norm = (2 * c.abs().pow(2).sum(dim=(1, 2))).sqrt()  # (n_atoms,)
        c = c / norm[:, None, None]
        self.coeffs = torch.cat([c, c.conj()], dim=-1)  # (n_atoms, C, F) Hermitian

    def spectrum(self, atom: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        """``(B, C, F)`` coefficients of ``sum_s scale * atom(x - shift)``."""
        phase = torch.exp(-2j * math.pi * (shift @ self.freqs.double().T))  # (B, s, F)
        weighted = scale[..., None] * phase  # (B, s, F)
        return torch.einsum("bsf,bscf->bcf", weighted, self.coeffs[atom])

    def render(self, atom: Tensor, scale: Tensor, shift: Tensor, grid: Grid) -> Tensor:
        return fourier_on_grid(self.spectrum(atom, scale, shift), self.freqs, grid)

    def atoms(self, grid: Grid) -> Tensor:
        """``(n_atoms, C, *grid)`` float64: every atom at its canonical position (no shift)."""
        return fourier_on_grid(self.coeffs, self.freqs, grid)


class BumpAtoms:
    """Localised atoms: signed sums of ``bumps`` periodised Gaussians, unit L2 norm.

    Atom ``j`` has a centre ``m_j`` uniform on the domain; its ``b``-th bump sits at
    ``m_j + o_b`` with ``o_b`` uniform in ``[-2 width, 2 width]^d``, has width
    ``sigma_b ~ U[width / 2, width]`` and, in channel ``c``, weight ``w_{c,b} ~ N(0, 1)``.
    The norm is computed in closed form (:func:`gaussian_overlap`), so atoms are exactly unit.

    Args:
        n_atoms: number of atoms.
        channels: channels ``C`` per atom.
        dims: 1 or 2.
        width: the largest bump width (std), at most :data:`MAX_BUMP_WIDTH`.
        bumps: Gaussians per atom.
        generator: source of the random parameters.
    """

    def __init__(
        self,
        n_atoms: int,
        channels: int,
        dims: int,
        width: float,
        bumps: int,
        generator: torch.Generator,
    ) -> None:
        if not 0 < width <= MAX_BUMP_WIDTH:
            raise ValueError(f"bump width {width} must be in (0, {MAX_BUMP_WIDTH}]")
        self.n_atoms, self.channels, self.dims = n_atoms, channels, dims
        g, f64 = generator, torch.float64
        centre = torch.rand(n_atoms, 1, dims, generator=g, dtype=f64)
        offset = (torch.rand(n_atoms, bumps, dims, generator=g, dtype=f64) * 2 - 1) * 2 * width
        self.centres = torch.remainder(centre + offset, 1.0)  # (n_atoms, bumps, d)
        self.widths = width * (0.5 + 0.5 * torch.rand(n_atoms, bumps, generator=g, dtype=f64))
        weights = torch.randn(n_atoms, channels, bumps, generator=g, dtype=f64)
        gram = gaussian_overlap(
            self.centres[:, :, None],
            self.widths[:, :, None],
            self.centres[:, None, :],
            self.widths[:, None, :],
        )  # (n_atoms, bumps, bumps)
        norm_sq = torch.einsum("acb,abe,ace->a", weights, gram, weights)
        self.weights = weights / norm_sq.sqrt()[:, None, None]  # (n_atoms, C, bumps)

    def render(self, atom: Tensor, scale: Tensor, shift: Tensor, grid: Grid) -> Tensor:
        # Separable: a d-dimensional periodised Gaussian is the product of 1-D ones.
        centres = self.centres[atom] + shift[:, :, None, :]  # (B, s, bumps, d)
        widths = self.widths[atom]  # (B, s, bumps)
        factors = [
            periodic_gaussian_1d(grid_points(n).to(centres.device), centres[..., axis], widths)
            for axis, n in enumerate(grid)
        ]  # each (B, s, bumps, N_axis)
        weights = self.weights[atom] * scale[:, :, None, None]  # (B, s, C, bumps)
        if self.dims == 1:
            return torch.einsum("bscm,bsmx->bcx", weights, factors[0])
        return torch.einsum("bscm,bsmx,bsmy->bcxy", weights, factors[0], factors[1])

    def atoms(self, grid: Grid) -> Tensor:
        """``(n_atoms, C, *grid)`` float64: every atom at its canonical position (no shift)."""
        ids = torch.arange(self.n_atoms)[:, None]
        ones = torch.ones(self.n_atoms, 1, dtype=torch.float64)
        zeros = torch.zeros(self.n_atoms, 1, self.dims, dtype=torch.float64)
        return self.render(ids, ones, zeros, grid)


class BandLimitedNoise:
    """White-in-band Gaussian noise as a continuous function, so it renders at any resolution.

    ``eta_c(x) = sum_{1 <= |k|_inf <= K} c_k exp(2 pi i k.x)`` with i.i.d. complex Gaussian
    ``c_k`` (Hermitian), scaled so ``E[sum_c int |eta_c|^2] / C = std^2``: the mean square per
    channel is ``std^2`` at every resolution.
    """

    def __init__(self, channels: int, dims: int, k_max: int, std: float) -> None:
        self.channels, self.std = channels, std
        self.freqs = frequencies(k_max, dims)
        # E|c_k|^2 = 2 sigma^2 for complex(N(0, s^2), N(0, s^2)); F modes in all
        self.mode_std = std / math.sqrt(len(self.freqs)) if len(self.freqs) else 0.0

    def draw(self, n: int, generator: torch.Generator) -> Tensor:
        """``(n, C, F)`` complex128 Hermitian coefficients of ``n`` noise functions."""
        half = len(self.freqs) // 2
        shape = (n, self.channels, half)
        re = torch.randn(*shape, generator=generator, dtype=torch.float64)
        im = torch.randn(*shape, generator=generator, dtype=torch.float64)
        c = torch.complex(re, im) * (self.mode_std / math.sqrt(2))
        return torch.cat([c, c.conj()], dim=-1)

    def render(self, coeffs: Tensor, grid: Grid) -> Tensor:
        """``(n, C, *grid)`` float64 point values."""
        return fourier_on_grid(coeffs, self.freqs, grid)
