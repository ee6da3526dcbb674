"""Function-space SAE encoders: ``(B, C, *grid)`` functions to pre-activations.

Notation: ``u: [0,1)^d -> R^C`` sampled on a grid ``N`` (``|N|`` points, quadrature weight
``w = 1/|N|``), ``p = d_sae`` concepts, ``<f, g> = w sum_n f(n/N) . g(n/N)`` the L2 inner
product by quadrature. ``SC^M_{a->b}`` is :class:`~sae_neural_operator.spectral.SpectralConv`
keeping frequencies ``|k| < M``. Two kinds of output:

* vector codes ``(B, p)`` (``sae_mlp``, ``lifted``): one scalar per concept; these models are
  tied to their training grid;
* concept maps ``(B, p, *grid)`` (``fno``, ``lifted_fno``, ``cnn``): one function ``z_j`` per
  concept, saying where and how strongly concept ``j`` is expressed.

All encoders set ``functional = True`` and ``center_input = False`` and have no ``affine()`` (so
the core never takes its fused linear path). Input centring by ``b_dec`` is omitted: ``b_dec`` is a
constant per channel and the encoder bias absorbs its effect.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from sae_lightning.components.base import Encoder
from sae_lightning.config import PluginConfig
from sae_lightning.errors import ConfigError
from sae_lightning.functional import quadrature_weight
from sae_neural_operator.lifting import (
    Grid,
    Modes,
    channel_vector,
    check_same_grid,
    function_grid,
    lifting_width,
    orthonormal_lifting,
)
from sae_neural_operator.spectral import SpectralConv


class FunctionEncoder(Encoder):
    """Base of the function encoders: inputs are ``(B, C, *grid)``, never centred.

    ``kind`` is the registered name, for messages. The lifted variants override :meth:`_lift`,
    the map applied to the input before the unlifted model's operator (identity here).
    """

    functional = True
    center_input = False
    kind: ClassVar[str] = "function"

    def _lift(self, x: Tensor) -> Tensor:
        return x


# ---- flattened grid: SAE-MLP and the lifted SAE ---------------------------------------------


def unit_functions(n: int, grid: tuple[int, ...], channels: int) -> Tensor:
    """``(n, channels |N|)`` random flattened functions of unit L2 norm (quadrature) on ``grid``."""
    w = torch.randn(n, channels * math.prod(grid))
    return w / w.norm(dim=1, keepdim=True) * math.sqrt(1.0 / quadrature_weight(grid))


class FlatFunctionEncoder(FunctionEncoder):
    """Vector codes on the flattened training grid: ``pre = w W_enc lift(vec(u)) + b_enc``.

    Subclasses set ``grid``, ``W_enc`` ``(p, width of lift)`` and ``b_enc`` ``(p,)``.
    """

    grid: tuple[int, ...]
    W_enc: nn.Parameter
    b_enc: nn.Parameter

    def forward(self, u: Tensor) -> Tensor:
        who = f"{self.kind} encoder"
        check_same_grid(function_grid(u, self.d_in, len(self.grid), who), self.grid, who)
        x = self._lift(u.flatten(1))  # (B, C |N|) or lifted (B, h)
        return torch.addmm(self.b_enc, x, self.W_enc.t(), alpha=quadrature_weight(self.grid))


class MLPFunctionEncoderConfig(PluginConfig):
    grid: Grid = Field(
        description="the fixed grid the SAE is trained at, e.g. [64] or [32, 32]; the flattened "
        "model runs only there"
    )


class MLPFunctionEncoder(FlatFunctionEncoder):
    """SAE-MLP encoder: z_j = <e_j, u> + b_j on the flattened grid (vector codes, one grid).

    ``pre_j = w sum_{c,n} e_j[c, n] u[c, n] + b_enc[j]``: the standard affine SAE encoder on
    ``vec(u)`` in ``R^{C |N|}`` with the quadrature weight folded in, so that ``e_j`` is an
    encoder *function* of O(1) values and ``pre_j`` the L2 inner product ``<e_j, u>``. Rows
    ``W_enc`` ``(p, C |N|)`` start as random functions of unit L2 norm.
    """

    Config = MLPFunctionEncoderConfig
    config: MLPFunctionEncoderConfig
    kind = "sae_mlp"

    def __init__(self, config: MLPFunctionEncoderConfig, *, d_in: int, d_sae: int) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae)
        self.grid = tuple(config.grid)
        self.W_enc = nn.Parameter(unit_functions(d_sae, self.grid, d_in))  # (p, C |N|)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))


class LiftedEncoderConfig(PluginConfig):
    grid: Grid = Field(
        description="the fixed grid the SAE is trained at, e.g. [64]; the model runs only there"
    )
    lifting_width: int | None = Field(
        None,
        ge=1,
        description="h, the lifted dimension (>= m = d_in * prod(grid)); default 2 m",
    )


class LiftedEncoder(FlatFunctionEncoder):
    """L-SAE encoder: z = W_e P x + b_e with a learned lifting P (h x m, h >= m).

    ``x = vec(u)`` in ``R^m`` (``m = C |N|``), ``pre = w W_enc (P x) + b_enc`` with
    ``P`` ``(h, m)`` and ``W_enc`` ``(p, h)``. The effective encoder ``W_enc P`` is an arbitrary
    ``p x m`` matrix, so the function class is the SAE-MLP's; the factorisation changes only
    the optimisation geometry (gradient descent on ``(W_enc, P)`` acts on ``W_enc P`` through a
    preconditioner, which is the paper's claim for lifting). ``P`` starts with orthonormal
    columns and ``W_enc = E P^T`` with ``E`` random unit-norm encoder functions, so that the
    effective encoder starts as exactly an SAE-MLP's (``W_enc P = E``).
    """

    Config = LiftedEncoderConfig
    config: LiftedEncoderConfig
    kind = "lifted"

    def __init__(self, config: LiftedEncoderConfig, *, d_in: int, d_sae: int) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae)
        self.grid = tuple(config.grid)
        m = d_in * math.prod(self.grid)
        self.lifting_width = lifting_width(config.lifting_width, m)
        p_mat = orthonormal_lifting(self.lifting_width, m)  # (h, m)
        e = unit_functions(d_sae, self.grid, d_in)
        self.P = nn.Parameter(p_mat)
        self.W_enc = nn.Parameter(e @ p_mat.t())  # (p, h)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))

    def effective_weight(self) -> Tensor:
        """``(p, m)`` the product ``W_enc P``: the encoder functions, flattened."""
        return self.W_enc @ self.P

    def _lift(self, x: Tensor) -> Tensor:
        return x @ self.P.t()  # (B, h)


# ---- neural operators: SAE-FNO and the lifted SAE-FNO ---------------------------------------


class FNOEncoderConfig(PluginConfig):
    modes: Modes = Field(
        (8,),
        description="Fourier modes kept per grid axis (frequencies |k| < M); its length is the "
        "domain dimension (1 or 2). The model runs at any grid with >= 2M points per axis",
    )
    full_grid: Grid | None = Field(
        None,
        description="instead of modes: keep every Fourier mode of this grid, so the operator is "
        "an arbitrary circular convolution there (and runs only on that grid)",
    )
    pointwise: bool = Field(
        False, description="add a pointwise linear term W u (a 1x1 convolution) to the encoder"
    )


def _spectral_layer(config: FNOEncoderConfig, in_channels: int, out_channels: int) -> SpectralConv:
    """The encoder's spectral convolution, checking that modes and full_grid are not both set."""
    if config.full_grid is not None:
        if "modes" in config.model_fields_set:
            raise ConfigError(
                "full_grid",
                f"is {list(config.full_grid)} but modes {list(config.modes)} is also set; full "
                "modes replace the mode count",
                "set either modes (truncated, any resolution) or full_grid (all modes, one grid)",
            )
        layer = SpectralConv.full(in_channels, out_channels, tuple(config.full_grid))
    else:
        layer = SpectralConv(in_channels, out_channels, tuple(config.modes))
    n_full = (
        math.prod(2 * m - 1 for m in layer.modes)
        if layer.full_grid is None
        else math.prod(layer.full_grid)
    )
    # Encoder kernels kappa_{c->j} of unit expected L2 norm per concept (Parseval: the sum of
    # |W|^2 over the full spectrum), so pre-activations start at the scale of ||u||. Flat
    # amplitude spectra: at init every concept passes the same energy of any input
    # (||kappa_j * u||^2 = sum_k |kappa_j^(k)|^2 |u^(k)|^2), so selecting concepts by the norm
    # of their maps (joint_topk) does not favour the few whose random spectra match the data.
    layer.reset_parameters(1.0 / math.sqrt(2 * in_channels * n_full), flat=True)
    return layer


class FNOEncoder(FunctionEncoder):
    """SAE-FNO encoder: concept maps z_j = SC^M_{C->p}(u)_j (+ (W u)_j) + b_j.

    ``pre_j(t) = sum_c int kappa_{c,j}(s) u_c(t - s) ds [+ sum_c W_{j,c} u_c(t)] + b_enc[j]``:
    a Fourier integral operator whose kernels ``kappa`` are band-limited (``|k| < M``) and
    stored by their Fourier coefficients, so one set of weights runs at every grid with at
    least ``2 M`` points per axis and gives samples of the same maps (resolution-invariant).
    With ``full_grid`` every mode of that grid is kept and the operator is an arbitrary
    circular convolution: SAE-FNO then equals a circular-convolution SAE (tested).
    The spectral weights start with random phases and one modulus (flat kernel spectra of unit
    expected L2 norm). Returns ``(B, p, *grid)``.
    """

    Config = FNOEncoderConfig
    config: FNOEncoderConfig
    kind = "fno"

    def __init__(self, config: FNOEncoderConfig, *, d_in: int, d_sae: int) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae)
        self._build_operator(config, d_in)

    def _build_operator(self, config: FNOEncoderConfig, channels: int) -> None:
        """The spectral layer, the optional pointwise term and the bias on ``channels`` inputs."""
        self.spectral = _spectral_layer(config, channels, self.d_sae)
        self.modes = self.spectral.modes
        self.full_grid = self.spectral.full_grid
        self.dims = self.spectral.dims
        self.W_point = (
            nn.Parameter(torch.randn(self.d_sae, channels) / math.sqrt(channels))
            if config.pointwise
            else None
        )
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))

    def forward(self, u: Tensor) -> Tensor:
        function_grid(u, self.d_in, self.dims, f"{self.kind} encoder")
        v = self._lift(u)  # (B, C or h, *grid)
        pre = self.spectral(v)  # (B, p, *grid)
        if self.W_point is not None:
            pre = pre + torch.einsum("pc,bc...->bp...", self.W_point.to(v.dtype), v)
        return pre + channel_vector(self.b_enc, pre)


class LiftedFNOEncoderConfig(FNOEncoderConfig):
    lifting_width: int | None = Field(
        None,
        ge=1,
        description="h, channels after the pointwise lifting P (>= d_in); default 2 d_in",
    )


class LiftedFNOEncoder(FNOEncoder):
    """L-SAE-FNO encoder: pointwise lifting P: C->h, then z_j = SC^M_{h->p}(P u)_j + b_j.

    ``pre = SC^M_{h->p}(P u) [+ W P u] + b_enc`` with ``P`` ``(h, C)`` applied at every point
    (the FNO lifting pattern). Both maps are linear, so this is an SAE-FNO with spectral
    weights ``sum_h W[h, j, k] P[h, c]``: the function class is unchanged, only the
    optimisation geometry differs. ``P`` starts with orthonormal columns (an isometry).
    """

    Config = LiftedFNOEncoderConfig
    config: LiftedFNOEncoderConfig
    kind = "lifted_fno"

    def __init__(self, config: LiftedFNOEncoderConfig, *, d_in: int, d_sae: int) -> None:
        h = lifting_width(config.lifting_width, d_in)
        FunctionEncoder.__init__(self, config, d_in=d_in, d_sae=d_sae)
        self.lifting_width = h
        self.P = nn.Parameter(orthonormal_lifting(h, d_in))  # (h, C)
        self._build_operator(config, h)

    def _lift(self, x: Tensor) -> Tensor:
        return torch.einsum("hc,bc...->bh...", self.P.to(x.dtype), x)  # (B, h, *grid)


# ---- SAE-CNN ---------------------------------------------------------------------------------


class CNNEncoderConfig(PluginConfig):
    kernel_size: Modes = Field(
        (9,),
        description="convolution kernel size per grid axis, in grid points (so its physical "
        "width shrinks on finer grids); its length is the domain dimension (1 or 2)",
    )


def circular_pad(x: Tensor, kernel_size: tuple[int, ...], *, flipped: bool) -> Tensor:
    """Pad the grid axes periodically for a 'same' convolution centred at ``K // 2``.

    Raises:
        ValueError: a kernel is larger than its grid axis.
    """
    grid = tuple(x.shape[2:])
    for a, (n, k) in enumerate(zip(grid, kernel_size, strict=True)):
        if k > n:
            raise ValueError(
                f"cnn: kernel_size {tuple(kernel_size)} is larger than grid {grid} on axis {a}; "
                f"use a grid with >= {k} points there or a smaller kernel_size"
            )
    pads: list[int] = []
    for k in reversed(kernel_size):  # F.pad lists the last axis first
        before, after = k // 2, k - 1 - k // 2
        pads += [after, before] if flipped else [before, after]
    return F.pad(x, pads, mode="circular")


def circular_correlate(u: Tensor, weight: Tensor, *, flipped: bool = False) -> Tensor:
    """``out[b, j, n] = sum_{c, m} weight[j, c, m] u[b, c, n + m - K//2 mod N]`` (1-D or 2-D).

    With ``flipped`` the padding is mirrored (offsets ``m - (K - 1 - K//2)``), which with a
    flipped ``weight`` makes it the convolution of :func:`circular_convolve`.
    """
    kernel_size = tuple(weight.shape[2:])
    padded = circular_pad(u, kernel_size, flipped=flipped)
    conv = F.conv1d if len(kernel_size) == 1 else F.conv2d
    return conv(padded, weight)


def circular_convolve(z: Tensor, kernels: Tensor) -> Tensor:
    """``out[b, c, n] = sum_{j, m} kernels[j, c, m] z[b, j, n - (m - K//2) mod N]``.

    The transpose of :func:`circular_correlate` with the same ``(p, C, *K)`` kernels (the
    SAE-CNN decoder of the encoder's correlation).
    """
    spatial = tuple(range(2, kernels.ndim))
    return circular_correlate(z, kernels.transpose(0, 1).flip(spatial), flipped=True)


class CNNEncoder(FunctionEncoder):
    """SAE-CNN encoder: concept maps z_j = (w_j correlated with u) + b_j, kernel in grid units.

    ``pre_j[n] = sum_{c, m} W_enc[j, c, m] u_c[n + m - K//2] + b_enc[j]`` (indices mod N): a
    circular 'same' cross-correlation with a kernel of ``K`` grid points per axis. The kernel
    is defined in grid units, so on another grid it covers a different part of the domain:
    the baseline that is *not* discretisation-invariant. Kernels start as random unit vectors.
    Returns ``(B, p, *grid)``.
    """

    Config = CNNEncoderConfig
    config: CNNEncoderConfig
    kind = "cnn"

    def __init__(self, config: CNNEncoderConfig, *, d_in: int, d_sae: int) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae)
        self.kernel_size = tuple(config.kernel_size)
        self.dims = len(self.kernel_size)
        w = torch.randn(d_sae, d_in, *self.kernel_size)
        w = w / w.flatten(1).norm(dim=1).view(-1, *([1] * (w.ndim - 1)))
        self.W_enc = nn.Parameter(w)  # (p, C, *K)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))

    def forward(self, u: Tensor) -> Tensor:
        function_grid(u, self.d_in, self.dims, f"{self.kind} encoder")
        pre = circular_correlate(u, self.W_enc.to(u.dtype))
        return pre + channel_vector(self.b_enc, pre)
