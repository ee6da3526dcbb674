"""Function-space SAE decoders: codes to reconstructed functions ``(B, C, *grid)``.

Notation as in :mod:`sae_neural_operator.encoders`. Every decoder has a bias ``b_dec`` of shape
``(C,)``, a constant function per channel (the same at every resolution), and a dictionary of
``p`` *concept functions* ``d_j: [0,1)^d -> R^C``:

* vector codes (``sae_mlp``, ``lifted``): ``u_hat = sum_j z_j d_j + b_dec``, with ``d_j``
  stored on the training grid;
* concept maps (``fno``, ``lifted_fno``, ``cnn``): ``u_hat = sum_j d_j * z_j + b_dec``, a
  circular convolution of each code map with its concept's kernel (``convolutional = True``:
  a concept is defined up to translation).

:meth:`FunctionDecoder.concept_functions` samples the ``d_j`` on a grid: for convolutional
decoders, the response to a unit-mass impulse code at the origin (value ``|N|`` at point 0).

Atom normalisation. With ``unit_norm`` (default) every concept function is rescaled to unit L2
norm (quadrature; for ``cnn`` the kernel's Euclidean norm) after each optimizer step, as the
core's linear decoder does. Why: ``(z_j, d_j) -> (c z_j, d_j / c)`` leaves the reconstruction
unchanged, so without a norm constraint an L1 penalty is minimised by shrinking codes and
inflating atoms, TopK selection by ``|z_j|`` compares latents on arbitrary scales, and recovery
metrics and pictures compare functions whose scale means nothing. For the spectral decoders
the norm is exact and resolution-free (Parseval on the stored modes), so the constraint does
not favour any grid. The radial gradient projection of the core decoder is not done: the
factored and spectral parameterisations have no per-atom tangent space in the parameters.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from sae_lightning.components.base import Codes, Decoder, Encoder
from sae_lightning.config import PluginConfig
from sae_lightning.errors import ConfigError
from sae_lightning.functional import quadrature_weight
from sae_neural_operator.encoders import circular_convolve
from sae_neural_operator.lifting import (
    Grid,
    Modes,
    channel_vector,
    check_same_grid,
    lifting_width,
    orthonormal_lifting,
)
from sae_neural_operator.spectral import SpectralConv

_UNIT_NORM = Field(
    True,
    description="rescale every concept function to unit L2 norm after each optimizer step "
    "(removes the code/atom scale ambiguity)",
)
_INIT_FROM_ENCODER = Field(
    True,
    description="start from the encoder's matched filters (transposed, conjugated), "
    "normalised, when the encoder has the same shape",
)


class FunctionDecoder(Decoder):
    """Base of the function decoders: concept functions, a per-channel bias, unit-norm atoms.

    ``kind`` is the registered name, for messages. Subclasses give :meth:`atom_norms` and
    :meth:`_scale_atoms_`; the base rescales the concepts to unit norm after every optimizer
    step when the config's ``unit_norm`` is set (every function decoder config has it).
    """

    convolutional: ClassVar[bool] = False
    kind: ClassVar[str] = "function"

    def __init__(self, config: PluginConfig, *, d_in: int, d_sae: int, encoder: Encoder) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae, encoder=encoder)
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def concept_functions(self, grid: tuple[int, ...]) -> Tensor:  # pragma: no cover - protocol
        """``(p, C, *grid)``: concept ``j``'s dictionary function sampled on ``grid``."""
        raise NotImplementedError

    def forward(self, codes: Codes) -> Tensor:
        """``(B, C, *grid)`` reconstruction: the dictionary term plus ``b_dec`` per channel."""
        out = self.decode_without_bias(codes)
        return out + channel_vector(self.b_dec, out)

    def _scale_atoms_(self, scale: Tensor) -> None:  # pragma: no cover - protocol
        """Multiply concept ``j`` by ``scale[j]`` in place."""
        raise NotImplementedError

    @torch.no_grad()
    def _normalise(self) -> None:
        self._scale_atoms_(1.0 / self.atom_norms().clamp_min(1e-12))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.config.unit_norm:
            self._normalise()


def _scale_rows_(param: Tensor, scale: Tensor) -> None:
    """Multiply ``param[j]`` by ``scale[j]`` in place (``param`` is ``(p, ...)``)."""
    param.mul_(scale.view(-1, *([1] * (param.ndim - 1))).to(param.dtype))


def _transposed_lifting(encoder: Encoder, width: int, dim: int) -> Tensor | None:
    """``P^T`` ``(dim, width)`` of a lifted encoder whose ``P`` is ``(width, dim)``, else None."""
    p_enc = getattr(encoder, "P", None)
    if isinstance(p_enc, Tensor) and p_enc.shape == (width, dim):
        return p_enc.detach().t().clone()
    return None


# ---- vector codes: SAE-MLP and the lifted SAE -----------------------------------------------


def _encoder_grid(config_grid: tuple[int, ...] | None, encoder: Encoder) -> tuple[int, ...]:
    if config_grid is not None:
        return tuple(config_grid)
    grid = getattr(encoder, "grid", None)
    if grid is None:
        raise ConfigError(
            "grid",
            f"not set and the encoder ({type(encoder).__name__}) has no grid to take it from",
            "set the decoder's grid to the training grid, e.g. grid: [64]",
        )
    return tuple(grid)


class FlatFunctionDecoder(FunctionDecoder):
    """Vector codes, concepts stored flattened on the training grid: ``atoms()`` row ``j`` is
    ``vec(d_j)`` ``(C |N|)``, and the concepts exist only at that grid.

    Subclasses set ``grid`` and give :meth:`_decode_flat`.
    """

    grid: tuple[int, ...]

    def _decode_flat(self, codes: Codes) -> Tensor:  # pragma: no cover - protocol
        """``(B, C |N|)`` flattened dictionary term of vector codes."""
        raise NotImplementedError

    def decode_without_bias(self, codes: Codes) -> Tensor:
        if codes.values.ndim != 2:
            raise ValueError(
                f"{self.kind} decoder: expected vector codes (batch, d_sae) or sparse (batch, k), "
                f"got concept maps of shape {tuple(codes.values.shape)}; pair it with the "
                "'sae_mlp' or 'lifted' encoder, or use a map decoder ('fno', 'lifted_fno', 'cnn')"
            )
        flat = self._decode_flat(codes)
        return flat.view(flat.shape[0], self.d_in, *self.grid)

    def atom_norms(self) -> Tensor:
        """``(p,)`` L2 norms of the concept functions (quadrature)."""
        return self.atoms().norm(dim=1) * math.sqrt(quadrature_weight(self.grid))

    def concept_functions(self, grid: tuple[int, ...]) -> Tensor:
        """``(p, C, *grid)`` the atoms reshaped; only at the training grid.

        Raises:
            ValueError: ``grid`` is not the training grid.
        """
        check_same_grid(tuple(grid), self.grid, f"{self.kind} decoder")
        return self.atoms().reshape(self.d_sae, self.d_in, *self.grid)


class MLPFunctionDecoderConfig(PluginConfig):
    grid: Grid | None = Field(
        None,
        description="the training grid the flattened atoms live on, e.g. [64]; default: the "
        "encoder's grid",
    )
    unit_norm: bool = _UNIT_NORM
    init_from_encoder: bool = _INIT_FROM_ENCODER


class MLPFunctionDecoder(FlatFunctionDecoder):
    """SAE-MLP decoder: u_hat = sum_j z_j d_j + b_dec with d_j stored on the training grid.

    ``W_dec`` ``(p, C |N|)`` holds ``vec(d_j)`` per row; the output is reshaped to
    ``(B, C, *grid)``. Sparse TopK codes decode by gathering ``k`` rows.
    """

    Config = MLPFunctionDecoderConfig
    config: MLPFunctionDecoderConfig
    kind = "sae_mlp"

    def __init__(
        self, config: MLPFunctionDecoderConfig, *, d_in: int, d_sae: int, encoder: Encoder
    ) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae, encoder=encoder)
        self.grid = _encoder_grid(config.grid, encoder)
        m = d_in * math.prod(self.grid)
        w_enc = getattr(encoder, "W_enc", None)
        if config.init_from_encoder and isinstance(w_enc, Tensor) and w_enc.shape == (d_sae, m):
            w = w_enc.detach().clone()
        else:
            w = torch.randn(d_sae, m)
        self.W_dec = nn.Parameter(w)  # (p, C |N|): vec(d_j) per row
        self._normalise()

    def atoms(self) -> Tensor:
        return self.W_dec

    def _decode_flat(self, codes: Codes) -> Tensor:
        return Decoder.decode_without_bias(self, codes)  # dense, or gathers k rows

    def _scale_atoms_(self, scale: Tensor) -> None:
        _scale_rows_(self.W_dec, scale)


class LiftedDecoderConfig(PluginConfig):
    grid: Grid | None = Field(
        None, description="the training grid, e.g. [64]; default: the encoder's grid"
    )
    lifting_width: int | None = Field(
        None,
        ge=1,
        description="h (>= m = d_in * prod(grid)); default: the encoder's, else 2 m",
    )
    unit_norm: bool = _UNIT_NORM
    init_from_encoder: bool = _INIT_FROM_ENCODER


class LiftedDecoder(FlatFunctionDecoder):
    """L-SAE decoder: u_hat = Q W_d z + b_dec with a learned projection Q (m x h).

    ``W_dec`` ``(h, p)`` and ``Q`` ``(m, h)``: concept ``j``'s function is column ``j`` of the
    product ``Q W_dec`` (reshaped to ``(C, *grid)``), an arbitrary ``m x p`` dictionary, so the
    function class is the SAE-MLP's. Initialised from a lifted encoder as its transpose
    (``Q = P^T``, ``Q W_dec = (W_enc P)^T`` normalised); unit norm applies to ``Q W_dec``.
    """

    Config = LiftedDecoderConfig
    config: LiftedDecoderConfig
    kind = "lifted"

    def __init__(
        self, config: LiftedDecoderConfig, *, d_in: int, d_sae: int, encoder: Encoder
    ) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae, encoder=encoder)
        self.grid = _encoder_grid(config.grid, encoder)
        m = d_in * math.prod(self.grid)
        h = lifting_width(config.lifting_width, m, getattr(encoder, "lifting_width", None))
        self.lifting_width = h
        q = _transposed_lifting(encoder, h, m) if config.init_from_encoder else None
        effective = getattr(encoder, "effective_weight", None)
        if q is not None and callable(effective):
            atoms = effective().detach()  # (p, m); q: (m, h), orthonormal rows at its init
        else:
            q = orthonormal_lifting(h, m).t()
            atoms = torch.randn(d_sae, m)
        self.Q = nn.Parameter(q)  # (m, h)
        self.W_dec = nn.Parameter(q.t() @ atoms.t())  # (h, p): Q W_dec = atoms^T
        self._normalise()

    def atoms(self) -> Tensor:
        return (self.Q @ self.W_dec).t()  # (p, m)

    def _decode_flat(self, codes: Codes) -> Tensor:
        z = codes.dense()  # (B, p)
        return (z.to(self.W_dec.dtype) @ self.W_dec.t()) @ self.Q.t()  # (B, h) -> (B, m)

    def _scale_atoms_(self, scale: Tensor) -> None:
        self.W_dec.mul_(scale.unsqueeze(0).to(self.W_dec.dtype))  # column j of (h, p)


# ---- concept maps: SAE-FNO, the lifted SAE-FNO and SAE-CNN ----------------------------------


def _map_codes(codes: Codes, dims: int, who: str) -> Tensor:
    values = codes.values
    if codes.indices is not None or values.ndim != 2 + dims:
        raise ValueError(
            f"{who} decoder: expected dense concept maps (batch, d_sae) + {dims} grid axes, got "
            f"{'sparse ' if codes.indices is not None else ''}codes of shape "
            f"{tuple(values.shape)}; pair it with a map encoder ('fno', 'lifted_fno', 'cnn') "
            f"of the same dimension"
        )
    return values


class FNODecoderConfig(PluginConfig):
    modes: Modes | None = Field(
        None, description="Fourier modes kept per grid axis (|k| < M); default: the encoder's"
    )
    full_grid: Grid | None = Field(
        None,
        description="instead of modes: keep every mode of this grid (a circular convolution "
        "there); default: the encoder's",
    )
    unit_norm: bool = _UNIT_NORM
    init_from_encoder: bool = _INIT_FROM_ENCODER


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


class FNODecoder(FunctionDecoder):
    """SAE-FNO decoder: u_hat = SC^M_{p->C}(z) + b_dec = sum_j d_j * z_j + b_dec.

    ``u_hat_c(t) = sum_j int d_{j,c}(s) z_j(t - s) ds + b_dec[c]`` with band-limited concept
    functions ``d_j`` whose Fourier coefficients are the spectral weights ``W[j, c, k]``
    (:meth:`SpectralConv.kernel`). Resolution-invariant like the encoder. ``atoms()`` samples
    the ``d_j`` on the smallest exact grid (``2 M`` per axis, or the full-mode grid).
    """

    Config = FNODecoderConfig
    config: FNODecoderConfig
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
        return self._project(self.spectral(_map_codes(codes, self.dims, self.kind)))

    def _scale_atoms_(self, scale: Tensor) -> None:
        _scale_rows_(self.spectral.weight, scale)


class LiftedFNODecoderConfig(FNODecoderConfig):
    lifting_width: int | None = Field(
        None,
        ge=1,
        description="h, channels before the projection Q (>= d_in); default: the "
        "encoder's, else 2 d_in",
    )


class LiftedFNODecoder(FNODecoder):
    """L-SAE-FNO decoder: u_hat = Q SC^M_{p->h}(z) + b_dec, Q: h->C pointwise.

    Concept ``j``'s function is ``Q d_j`` with ``d_j`` the ``h``-channel spectral kernel (the
    FNO projection pattern); as a product of linear maps it is an SAE-FNO decoder with weights
    ``sum_h Q[c, h] W[j, h, k]``. From a lifted_fno encoder it starts as its matched filter
    (``Q = P^T``, conjugated transposed spectral weights); unit norm applies to ``Q d_j``.
    """

    Config = LiftedFNODecoderConfig
    config: LiftedFNODecoderConfig
    kind = "lifted_fno"

    def __init__(
        self, config: LiftedFNODecoderConfig, *, d_in: int, d_sae: int, encoder: Encoder
    ) -> None:
        FunctionDecoder.__init__(self, config, d_in=d_in, d_sae=d_sae, encoder=encoder)
        h = lifting_width(config.lifting_width, d_in, getattr(encoder, "lifting_width", None))
        self.lifting_width = h
        matched = self._build_spectral(config, encoder, h)
        q = _transposed_lifting(encoder, h, d_in)
        if matched is not None and q is not None:
            self._load_spectral(matched)
        else:
            q = orthonormal_lifting(h, d_in).t()
        self.Q = nn.Parameter(q)  # (C, h)
        self._normalise()

    def _project(self, v: Tensor) -> Tensor:
        return torch.einsum("ch,bh...->bc...", self.Q.to(v.dtype), v)  # (B, h, ...) -> (B, C, ...)


class CNNDecoderConfig(PluginConfig):
    kernel_size: Modes | None = Field(
        None,
        description="kernel size per grid axis, in grid points; default: the encoder's",
    )
    unit_norm: bool = Field(
        True,
        description="rescale every kernel to unit Euclidean norm after each optimizer step",
    )
    init_from_encoder: bool = _INIT_FROM_ENCODER


class CNNDecoder(FunctionDecoder):
    """SAE-CNN decoder: u_hat = sum_j w_j * z_j + b_dec, a circular convolution in grid units.

    ``u_hat_c[n] = sum_{j, m} W_dec[j, c, m] z_j[n - (m - K//2)] + b_dec[c]`` (indices mod N):
    kernel value ``m`` sits at offset ``m - K//2`` from the code's point. Like the encoder it
    is defined in grid points, not on the domain, so it does not transfer across resolutions.
    ``atoms()`` are the kernels ``(p, C * prod(K))`` (``atom_norms`` their Euclidean norms);
    ``concept_functions(grid)`` the response to a unit-mass impulse (value ``|N|`` at the
    origin), i.e. ``|N| w_j`` placed at its offsets; unit norm applies to the kernel as a vector.
    """

    Config = CNNDecoderConfig
    config: CNNDecoderConfig
    convolutional = True
    kind = "cnn"

    def __init__(
        self, config: CNNDecoderConfig, *, d_in: int, d_sae: int, encoder: Encoder
    ) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae, encoder=encoder)
        kernel_size = config.kernel_size or getattr(encoder, "kernel_size", None)
        if kernel_size is None:
            raise ConfigError(
                "kernel_size",
                f"not set and the encoder ({type(encoder).__name__}) has none to take it from",
                "set the decoder's kernel_size, e.g. kernel_size: [9]",
            )
        self.kernel_size = tuple(kernel_size)
        self.dims = len(self.kernel_size)
        w_enc = getattr(encoder, "W_enc", None)
        shape = (d_sae, d_in, *self.kernel_size)
        if config.init_from_encoder and isinstance(w_enc, Tensor) and w_enc.shape == shape:
            w = w_enc.detach().clone()  # the encoder's template at the same offsets: matched
        else:
            w = torch.randn(shape)
        self.W_dec = nn.Parameter(w)  # (p, C, *K)
        self._normalise()

    def atoms(self) -> Tensor:
        return self.W_dec.flatten(1)

    def decode_without_bias(self, codes: Codes) -> Tensor:
        z = _map_codes(codes, self.dims, self.kind)
        return circular_convolve(z, self.W_dec.to(z.dtype))

    def concept_functions(self, grid: tuple[int, ...]) -> Tensor:
        """``(p, C, *grid)``: ``|N| W_dec[j]`` placed at offsets ``m - K//2`` (mod N).

        Raises:
            ValueError: the kernel is larger than ``grid``.
        """
        grid = tuple(int(n) for n in grid)
        if len(grid) != self.dims or any(
            k > n for k, n in zip(self.kernel_size, grid, strict=True)
        ):
            raise ValueError(
                f"cnn decoder: kernel_size {self.kernel_size} does not fit grid {grid}; use a "
                f"{self.dims}-axis grid with at least {self.kernel_size} points"
            )
        out = self.W_dec.new_zeros(self.d_sae, self.d_in, *grid)
        index = [
            (torch.arange(k, device=out.device) - k // 2) % n
            for k, n in zip(self.kernel_size, grid, strict=True)
        ]
        values = self.W_dec * math.prod(grid)
        if self.dims == 1:
            out[:, :, index[0]] = values
        else:
            out[:, :, index[0][:, None], index[1][None, :]] = values
        return out

    def _scale_atoms_(self, scale: Tensor) -> None:
        _scale_rows_(self.W_dec, scale)
