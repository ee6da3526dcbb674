"""Spectral convolution: the Fourier-domain integral operator of an FNO layer, on 1-D and 2-D grids.

A function ``u: [0,1)^d -> R^{C_in}`` sampled on a uniform periodic grid ``N = (N_1, .., N_d)``
(point ``n`` at ``n / N``) is mapped to ``v: [0,1)^d -> R^{C_out}``::

    v_o(t) = sum_i  sum_{k in K}  W_{i,o}[k] * uhat_i[k] * exp(2 pi i k.t)           (1)
    uhat_i[k] = (1 / |N|) sum_n u_i(n / N) exp(-2 pi i k.n / N)                     (2)

``(2)`` is ``rfftn(u, norm="forward")``: for a function band-limited below ``N_a / 2`` on every
axis it is the exact Fourier coefficient ``int u(t) exp(-2 pi i k.t) dt``, independent of the
grid, and ``(1)`` is ``irfftn(.., s=N, norm="forward")``, a plain evaluation of the Fourier series
at the grid points. So the same weights applied to the same function sampled at any grid with
enough points give samples of the same output function: the layer is resolution-invariant.

Kept modes ``K``. With ``modes = (M_1, .., M_d)`` the layer keeps every frequency with
``|k_a| < M_a`` on each axis. Real signals have Hermitian spectra, so only the half-space
``k_d >= 0`` is stored (the ``rfft`` half of the last axis, frequencies ``0..M_d-1``) and both
signs ``-(M_a-1)..(M_a-1)`` on the other axes: ``weight`` has shape
``(C_in, C_out, 2 M_1 - 1, .., 2 M_{d-1} - 1, M_d, 2)`` (real and imaginary parts; stored real
so every core tool that reads parameters, e.g. ``torch.aminmax``, works). A grid axis with fewer
than ``2 M_a`` points is refused: on ``2 M_a - 2`` points the highest kept frequency ``M_a - 1``
is the Nyquist frequency, whose sine part the grid cannot represent (it aliases); ``2 M_a`` keeps
a margin of one frequency.

Full modes (``SpectralConv.full(C_in, C_out, grid)``): one complex weight on every DFT bin of one
fixed ``grid`` (all of ``0..N_a-1`` on the leading axes, ``0..N_d // 2`` on the last). The layer
then is an arbitrary real circular convolution on that grid, with kernel
``kappa[n] = (1/|N|) sum_k W[k] exp(2 pi i k.n / N)`` (Hermitian-extended ``W``)::

    v_o[n] = sum_i sum_m kappa_{i,o}[m] u_i[n - m mod N],

and it refuses any other grid.

Real-signal subtleties. On the self-conjugate planes of the half spectrum (``k_d = 0`` and, in full
mode on an even last axis, the Nyquist plane ``k_d = N_d / 2``) a real output can only carry the
Hermitian part of the product, so the layer symmetrises there explicitly:
``Y[k] <- (Y[k] + conj(Y[-k])) / 2``. Effective weights: ``W_eff[k] = (W[k] + conj(W[-k])) / 2``
on those planes, ``W[k]`` elsewhere; :meth:`SpectralConv.kernel` returns the real-space kernel
function built from them. ``irfftn`` on torch's CPU backend and on cuFFT (checked on an H100,
float64) already keeps exactly this part of a non-Hermitian input, but that is a property of
the backends, not of the transform's contract; the explicit step makes the operator (and its
gradient) the one defined here on every backend, for the cost of one plane per call.
Truncated modes never reach a Nyquist frequency (``M_a - 1 < N_a / 2``), so there the layer is
exactly resolution-consistent; full modes keep the Nyquist bin, whose real part is the only
one a real kernel can have.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _check_grid_dims(grid: tuple[int, ...], what: str) -> None:
    if len(grid) not in (1, 2) or any(int(n) < 1 for n in grid):
        raise ValueError(f"{what}: expected 1 or 2 positive grid sizes, got {tuple(grid)}")


class SpectralConv(nn.Module):
    """Fourier integral operator ``(B, C_in, *grid) -> (B, C_out, *grid)`` on kept modes.

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        modes: ``(M_1, ..)`` per grid axis (1 or 2 axes): keep frequencies ``|k_a| < M_a``.
        scale: standard deviation of the real and imaginary parts of each initial weight;
            default ``1 / sqrt(2 C_in)`` (unit-variance complex weights over ``C_in``).

    Raises:
        ValueError: ``modes`` is empty, has more than 2 axes or a non-positive entry.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        modes: tuple[int, ...],
        *,
        scale: float | None = None,
        _full_grid: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.full_grid: tuple[int, ...] | None = (
            None if _full_grid is None else tuple(int(n) for n in _full_grid)
        )
        if self.full_grid is not None:
            _check_grid_dims(self.full_grid, "SpectralConv.full grid")
            modes = tuple(self.full_grid)
        modes = tuple(int(m) for m in modes)
        if len(modes) not in (1, 2) or any(m < 1 for m in modes):
            raise ValueError(
                f"SpectralConv modes: expected 1 or 2 positive mode counts (one per grid axis), "
                f"got {modes}"
            )
        self.modes = modes
        self.dims = len(modes)
        # Stored rows of each leading axis as DFT indices, and the stored row of the negated
        # frequency (for the Hermitian symmetrisation of self-conjugate planes).
        for a, m in enumerate(modes[:-1]):
            if self.full_grid is None:  # stored j is frequency j - (M-1): pair j <-> 2(M-1) - j
                pair = torch.arange(2 * m - 2, -1, -1)
            else:  # stored j is DFT index j: pair j <-> -j mod N
                pair = (-torch.arange(m)) % m
            self.register_buffer(f"_pair{a}", pair, persistent=False)
        if self.full_grid is None:
            shape = [*(2 * m - 1 for m in modes[:-1]), modes[-1]]
        else:
            shape = [*self.full_grid[:-1], self.full_grid[-1] // 2 + 1]
        self.weight = nn.Parameter(torch.empty(self.in_channels, self.out_channels, *shape, 2))
        self.reset_parameters(scale)

    @classmethod
    def full(
        cls,
        in_channels: int,
        out_channels: int,
        grid: tuple[int, ...],
        *,
        scale: float | None = None,
    ) -> SpectralConv:
        """A layer with a weight on every DFT bin of ``grid``: any circular convolution there.

        Args:
            in_channels: ``C_in``.
            out_channels: ``C_out``.
            grid: the only grid the layer accepts, 1 or 2 axes.
            scale: as in the constructor.
        """
        return cls(in_channels, out_channels, tuple(grid), scale=scale, _full_grid=tuple(grid))

    @torch.no_grad()
    def reset_parameters(self, scale: float | None = None, *, flat: bool = False) -> None:
        """Draw real and imaginary parts i.i.d. normal with std ``scale``.

        Args:
            scale: the std (default ``1 / sqrt(2 C_in)``).
            flat: instead give every complex weight the same modulus ``sqrt(2) scale`` (the
                same mean power) and a uniform random phase: each kernel then has a flat
                amplitude spectrum on the kept modes, so by Parseval it passes the energy of
                any input equally, whatever the input's spectrum.
        """
        std = 1.0 / math.sqrt(2 * self.in_channels) if scale is None else float(scale)
        if flat:
            phase = torch.rand(self.weight.shape[:-1], dtype=self.weight.dtype) * (2 * math.pi)
            modulus = math.sqrt(2.0) * std
            self.weight.copy_(torch.stack([phase.cos(), phase.sin()], dim=-1) * modulus)
        else:
            self.weight.normal_(0.0, std)

    def extra_repr(self) -> str:
        kept = f"full_grid={self.full_grid}" if self.full_grid else f"modes={self.modes}"
        return f"{self.in_channels}, {self.out_channels}, {kept}"

    # ---- grids -------------------------------------------------------------------------------

    def min_grid(self) -> tuple[int, ...]:
        """The smallest grid the layer accepts (``2 M`` per axis, or the full-mode grid)."""
        if self.full_grid is not None:
            return self.full_grid
        return tuple(2 * m for m in self.modes)

    def check_grid(self, grid: tuple[int, ...]) -> None:
        """Raise a ValueError unless the layer can run on ``grid``.

        Raises:
            ValueError: wrong number of axes, an axis with fewer than ``2 M_a`` points, or (full
                modes) a grid other than the one the layer was built for.
        """
        grid = tuple(int(n) for n in grid)
        if len(grid) != self.dims:
            raise ValueError(
                f"SpectralConv: input grid {grid} has {len(grid)} axes but the layer has "
                f"{self.dims} (modes {self.modes}); pass tensors shaped (batch, channels, "
                f"{', '.join('N' + str(a + 1) for a in range(self.dims))})"
            )
        if self.full_grid is not None:
            if grid != self.full_grid:
                raise ValueError(
                    f"SpectralConv: full-mode layer built for grid {self.full_grid} got grid "
                    f"{grid}; a full-mode layer is a circular convolution on one grid only: "
                    f"resample the input to {self.full_grid} or use truncated modes"
                )
            return
        for a, (n, m) in enumerate(zip(grid, self.modes, strict=True)):
            if n < 2 * m:
                raise ValueError(
                    f"SpectralConv: grid axis {a} has {n} points but modes {self.modes} keep "
                    f"frequencies up to {m - 1} on it, which needs at least 2*{m} = {2 * m} "
                    f"points (grid {grid}); sample the function on a finer grid "
                    f"(>= {self.min_grid()}) or lower modes[{a}] to <= {n // 2}"
                )

    # ---- spectra -----------------------------------------------------------------------------

    def _complex_weight(self) -> Tensor:
        w = self.weight
        if w.dtype not in (torch.float32, torch.float64):
            w = w.float()
        return torch.view_as_complex(w.contiguous())

    def _row_index(self, axis: int, n: int, device: torch.device) -> Tensor:
        """DFT indices (on an axis of ``n`` points) of the stored rows of leading ``axis``."""
        if self.full_grid is not None:
            return torch.arange(n, device=device)
        m = self.modes[axis]
        return torch.arange(-(m - 1), m, device=device) % n

    def _symmetrise(self, y: Tensor, last_size: int) -> Tensor:
        """Hermitian-symmetrise the self-conjugate planes of a stored half spectrum ``y``.

        ``y`` is ``(..., *leading_rows, cols)`` in stored layout. Plane ``k_d = 0`` always; the
        Nyquist plane ``k_d = N_d / 2`` only when it is stored (full modes, even ``N_d``).
        """
        cols = [0]
        if self.full_grid is not None and last_size % 2 == 0 and y.shape[-1] > last_size // 2:
            cols.append(last_size // 2)
        lead = self.dims - 1
        pieces = list(y.unbind(-1)) if len(cols) > 1 else None
        out = y
        for c in cols:
            plane = y[..., c]
            mirrored = plane
            for a in range(lead):
                dim = plane.ndim - lead + a
                mirrored = mirrored.index_select(dim, getattr(self, f"_pair{a}"))
            sym = 0.5 * (plane + mirrored.conj())
            if pieces is not None:
                pieces[c] = sym
            else:
                out = torch.cat([sym.unsqueeze(-1), y[..., 1:]], dim=-1)
        if pieces is not None:
            out = torch.stack(pieces, dim=-1)
        return out

    def _place(self, y: Tensor, grid: tuple[int, ...]) -> Tensor:
        """Scatter a stored half spectrum ``(..., *rows, cols)`` onto the rfft grid of ``grid``."""
        lead = self.dims - 1
        half = grid[-1] // 2 + 1
        if y.shape[-1] < half:
            pad = y.new_zeros(*y.shape[:-1], half - y.shape[-1])
            y = torch.cat([y, pad], dim=-1)
        for a in range(lead):
            dim = y.ndim - 1 - lead + a
            if self.full_grid is not None:
                continue
            shape = list(y.shape)
            shape[dim] = grid[a]
            index = self._row_index(a, grid[a], y.device)
            y = y.new_zeros(shape).index_copy(dim, index, y)
        return y

    def forward(self, u: Tensor) -> Tensor:
        """Apply the operator.

        Args:
            u: ``(B, C_in, *grid)`` real samples on the periodic unit domain.

        Returns:
            ``(B, C_out, *grid)`` samples of the output function on the same grid.

        Raises:
            ValueError: the grid is too coarse for ``modes`` (see :meth:`check_grid`) or the
                channel count is wrong.
        """
        if u.ndim != 2 + self.dims or u.shape[1] != self.in_channels:
            raise ValueError(
                f"SpectralConv: expected input (batch, {self.in_channels}, "
                f"{self.dims} grid axes), got shape {tuple(u.shape)}"
            )
        grid = tuple(u.shape[2:])
        self.check_grid(grid)
        dims = tuple(range(2, 2 + self.dims))
        in_dtype = u.dtype
        x = u if u.dtype in (torch.float32, torch.float64) else u.float()
        spec = torch.fft.rfftn(x, dim=dims, norm="forward")  # (B, C_in, *grid[:-1], N_d//2+1)
        # Gather the kept modes into the stored layout: (B, C_in, *rows, M_d).
        kept = spec[..., : self.weight.shape[-2]]
        for a in range(self.dims - 1):
            kept = kept.index_select(2 + a, self._row_index(a, grid[a], u.device))
        w = self._complex_weight().to(kept.dtype)
        y = torch.einsum("bi...,io...->bo...", kept, w)  # (B, C_out, *rows, M_d)
        y = self._symmetrise(y, grid[-1])
        out = torch.fft.irfftn(self._place(y, grid), s=grid, dim=dims, norm="forward")
        return out.to(in_dtype)

    def kernel(self, grid: tuple[int, ...]) -> Tensor:
        """The real kernel function ``kappa_{i,o}(t) = sum_k W_eff[k] exp(2 pi i k.t)`` on ``grid``.

        It is the layer's response to a unit-mass impulse at the origin (value ``|N|`` at point
        0, so that its quadrature integral is 1): ``v = kappa * u`` as a continuous circular
        convolution ``v(t) = int kappa(s) u(t - s) ds``, of which the layer's output is the
        exact quadrature on the grid. Samples of the same function at every valid grid.

        Args:
            grid: 1 or 2 grid sizes (each axis >= ``2 M_a``, or the full-mode grid).

        Returns:
            ``(C_in, C_out, *grid)`` real tensor.
        """
        grid = tuple(int(n) for n in grid)
        self.check_grid(grid)
        w = self._symmetrise(self._complex_weight(), grid[-1])
        dims = tuple(range(2, 2 + self.dims))
        return torch.fft.irfftn(self._place(w, grid), s=grid, dim=dims, norm="forward")
