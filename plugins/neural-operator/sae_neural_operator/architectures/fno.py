"""SAE-FNO: spectral-convolution encoder and decoder; concept maps at any grid, one weight set."""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor, nn

from sae_lightning.components.base import Codes, Encoder
from sae_lightning.config import PluginConfig
from sae_lightning.errors import ConfigError
from sae_lightning.functional import quadrature_weight
from sae_neural_operator.architectures.common import (
    FunctionDecoder,
    FunctionDecoderConfig,
    FunctionEncoder,
    Grid,
    Modes,
    channel_vector,
    function_grid,
    map_codes,
    scale_rows_,
)
from sae_neural_operator.spectral import SpectralConv


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


class FNOEncoder(FunctionEncoder[FNOEncoderConfig]):
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


class FNODecoderConfig(FunctionDecoderConfig):
    modes: Modes | None = Field(
        None, description="Fourier modes kept per grid axis (|k| < M); default: the encoder's"
    )
    full_grid: Grid | None = Field(
        None,
        description="instead of modes: keep every mode of this grid (a circular convolution "
        "there); default: the encoder's",
    )


def _decoder_spectral(
    config: FNODecoderConfig, encoder: Encoder, in_ch: int, out_ch: int
) -> SpectralConv:
    """The decoder's spectral layer, taking modes/full_grid from the encoder when unset."""
    if config.modes is not None and config.full_grid is not None:
        raise ConfigError(
            "full_grid",
            f"is {list(config.full_grid)} but modes {list(config.modes)} is also set",
            "set either modes (truncated, any resolution) or full_grid (all modes, one grid)",
        )
    if config.full_grid is not None:
        return SpectralConv.full(in_ch, out_ch, tuple(config.full_grid))
    if config.modes is not None:
        return SpectralConv(in_ch, out_ch, tuple(config.modes))
    enc = getattr(encoder, "spectral", None)
    if not isinstance(enc, SpectralConv):
        raise ConfigError(
            "modes",
            f"not set and the encoder ({type(encoder).__name__}) has no spectral layer to take "
            "it from",
            "set the decoder's modes, e.g. modes: [8] (or full_grid)",
        )
    if enc.full_grid is not None:
        return SpectralConv.full(in_ch, out_ch, enc.full_grid)
    return SpectralConv(in_ch, out_ch, enc.modes)


def _matched_weight(encoder: Encoder, layer: SpectralConv) -> Tensor | None:
    """The encoder's spectral weight transposed and conjugated, when it fits ``layer``.

    The encoder convolves with ``kappa_{c->j}``; the matched filter of decoder kernel
    ``d_{j->c}(s) = kappa_{c->j}(-s)`` has conjugate Fourier coefficients.
    """
    enc = getattr(encoder, "spectral", None)
    if not isinstance(enc, SpectralConv):
        return None
    w = enc.weight.detach().transpose(0, 1).clone()  # (p, in_enc, ..., 2)
    if w.shape != layer.weight.shape or enc.full_grid != layer.full_grid:
        return None
    w[..., 1].neg_()
    return w


class FNODecoder(FunctionDecoder[FNODecoderConfig]):
    """SAE-FNO decoder: u_hat = SC^M_{p->C}(z) + b_dec = sum_j d_j * z_j + b_dec.

    ``u_hat_c(t) = sum_j int d_{j,c}(s) z_j(t - s) ds + b_dec[c]`` with band-limited concept
    functions ``d_j`` whose Fourier coefficients are the spectral weights ``W[j, c, k]``
    (:meth:`SpectralConv.kernel`). Resolution-invariant like the encoder. ``atoms()`` samples
    the ``d_j`` on the smallest exact grid (``2 M`` per axis, or the full-mode grid).
    """

    convolutional = True
    kind = "fno"

    def __init__(
        self, config: FNODecoderConfig, *, d_in: int, d_sae: int, encoder: Encoder
    ) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae, encoder=encoder)
        matched = self._build_spectral(config, encoder, d_in)
        if matched is not None:
            self._load_spectral(matched)
        self._normalise()

    def _build_spectral(
        self, config: FNODecoderConfig, encoder: Encoder, channels: int
    ) -> Tensor | None:
        """Set the spectral layer ``p -> channels``; return the encoder's matched filter for it
        (None when it does not fit or ``init_from_encoder`` is off)."""
        self.spectral = _decoder_spectral(config, encoder, self.d_sae, channels)
        self.dims = self.spectral.dims
        return _matched_weight(encoder, self.spectral) if config.init_from_encoder else None

    @torch.no_grad()
    def _load_spectral(self, weight: Tensor) -> None:
        self.spectral.weight.copy_(weight)

    def _project(self, v: Tensor) -> Tensor:
        """The spectral layer's output channels to the ``C`` data channels (identity here)."""
        return v

    def _kernels(self, grid: tuple[int, ...]) -> Tensor:
        return self._project(self.spectral.kernel(grid))  # (p, C, *grid)

    def concept_functions(self, grid: tuple[int, ...]) -> Tensor:
        """``(p, C, *grid)``: kernel ``d_j`` sampled on ``grid`` (any grid >= 2M per axis)."""
        return self._kernels(tuple(grid))

    def atoms(self) -> Tensor:
        return self.concept_functions(self.spectral.min_grid()).flatten(1)

    def atom_norms(self) -> Tensor:
        """``(p,)`` exact L2 norms of the concept functions (quadrature on the 2M grid)."""
        grid = self.spectral.min_grid()
        sq = self._kernels(grid).pow(2).flatten(1).sum(dim=1) * quadrature_weight(grid)
        return sq.sqrt()

    def decode_without_bias(self, codes: Codes) -> Tensor:
        return self._project(self.spectral(map_codes(codes, self.dims, self.kind)))

    def _scale_atoms_(self, scale: Tensor) -> None:
        scale_rows_(self.spectral.weight, scale)
