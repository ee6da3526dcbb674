"""Shared pieces of the function-space encoders and decoders: config types, shape checks, lifting,
and the base classes every architecture file builds on.

Everything here is about functions sampled on the periodic unit domain ``[0, 1)^d`` (``d`` = 1
or 2) on a uniform grid, as in :mod:`sae_lightning.functional`: a batch is
``(batch, channels, *grid)`` and a grid point has quadrature weight ``1 / prod(grid)``.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, TypeVar

import torch
from pydantic import Field
from torch import Tensor, nn

from sae_lightning.components.base import Codes, ConfigT, Decoder, Encoder
from sae_lightning.config import PluginConfig
from sae_lightning.errors import ConfigError
from sae_lightning.functional import quadrature_weight

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
    it factors (see :class:`sae_neural_operator.architectures.lifted.LiftedEncoder`).
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


# ---- encoders --------------------------------------------------------------------------------


class FunctionEncoder(Encoder[ConfigT]):
    """Base of the function encoders: inputs are ``(B, C, *grid)``, never centred.

    ``kind`` is the registered name, for messages. The lifted variants override :meth:`_lift`,
    the map applied to the input before the unlifted model's operator (identity here).
    """

    functional = True
    center_input = False
    kind: ClassVar[str] = "function"

    def _lift(self, x: Tensor) -> Tensor:
        return x


def unit_functions(n: int, grid: tuple[int, ...], channels: int) -> Tensor:
    """``(n, channels |N|)`` random flattened functions of unit L2 norm (quadrature) on ``grid``."""
    w = torch.randn(n, channels * math.prod(grid))
    return w / w.norm(dim=1, keepdim=True) * math.sqrt(1.0 / quadrature_weight(grid))


class FlatFunctionEncoder(FunctionEncoder[ConfigT]):
    """Vector codes on the flattened training grid: ``pre = w W_enc lift(vec(u)) + b_enc``.

    The base sets ``grid`` (the config's) and ``flat_dim`` ``m = C |N|``; subclasses set
    ``W_enc`` ``(p, width of lift)`` and ``b_enc`` ``(p,)``.
    """

    W_enc: nn.Parameter
    b_enc: nn.Parameter

    def __init__(self, config: ConfigT, *, d_in: int, d_sae: int) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae)
        self.grid: tuple[int, ...] = tuple(config.grid)
        self.flat_dim = d_in * math.prod(self.grid)

    def forward(self, u: Tensor) -> Tensor:
        who = f"{self.kind} encoder"
        check_same_grid(function_grid(u, self.d_in, len(self.grid), who), self.grid, who)
        x = self._lift(u.flatten(1))  # (B, C |N|) or lifted (B, h)
        return torch.addmm(self.b_enc, x, self.W_enc.t(), alpha=quadrature_weight(self.grid))


# ---- decoders --------------------------------------------------------------------------------


class FunctionDecoderConfig(PluginConfig):
    """The settings every function decoder has; each decoder's config extends it."""

    unit_norm: bool = Field(
        True,
        description="rescale every concept function to unit L2 norm after each optimizer step "
        "(removes the code/atom scale ambiguity)",
    )
    init_from_encoder: bool = Field(
        True,
        description="start from the encoder's matched filters (transposed, conjugated), "
        "normalised, when the encoder has the same shape",
    )


DecoderConfigT = TypeVar("DecoderConfigT", bound=FunctionDecoderConfig)


class FunctionDecoder(Decoder[DecoderConfigT]):
    """Base of the function decoders: concept functions, a per-channel bias, unit-norm atoms.

    ``kind`` is the registered name, for messages. Subclasses give :meth:`atom_norms` and
    :meth:`_scale_atoms_`; the base rescales the concepts to unit norm after every optimizer
    step when the config's ``unit_norm`` is set.
    """

    convolutional: ClassVar[bool] = False
    kind: ClassVar[str] = "function"

    def __init__(self, config: DecoderConfigT, *, d_in: int, d_sae: int, encoder: Encoder) -> None:
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


def scale_rows_(param: Tensor, scale: Tensor) -> None:
    """Multiply ``param[j]`` by ``scale[j]`` in place (``param`` is ``(p, ...)``)."""
    param.mul_(scale.view(-1, *([1] * (param.ndim - 1))).to(param.dtype))


def transposed_lifting(encoder: Encoder, width: int, dim: int) -> Tensor | None:
    """``P^T`` ``(dim, width)`` of a lifted encoder whose ``P`` is ``(width, dim)``, else None."""
    p_enc = getattr(encoder, "P", None)
    if isinstance(p_enc, Tensor) and p_enc.shape == (width, dim):
        return p_enc.detach().t().clone()
    return None


def encoder_grid(config_grid: tuple[int, ...] | None, encoder: Encoder) -> tuple[int, ...]:
    """The decoder's training grid: its own ``grid`` setting, else the encoder's.

    Raises:
        ConfigError: neither is set.
    """
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


class FlatFunctionDecoder(FunctionDecoder[DecoderConfigT]):
    """Vector codes, concepts stored flattened on the training grid: ``atoms()`` row ``j`` is
    ``vec(d_j)`` ``(C |N|)``, and the concepts exist only at that grid.

    The base sets ``grid`` (the config's, else the encoder's) and ``flat_dim`` ``m = C |N|``;
    subclasses give :meth:`_decode_flat`.
    """

    def __init__(self, config: DecoderConfigT, *, d_in: int, d_sae: int, encoder: Encoder) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae, encoder=encoder)
        self.grid = encoder_grid(config.grid, encoder)
        self.flat_dim = d_in * math.prod(self.grid)

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


def map_codes(codes: Codes, dims: int, who: str) -> Tensor:
    """The dense concept maps ``(B, p, *grid)`` of ``codes``, for a map decoder.

    Raises:
        ValueError: the codes are sparse or have another number of grid axes.
    """
    values = codes.values
    if codes.indices is not None or values.ndim != 2 + dims:
        raise ValueError(
            f"{who} decoder: expected dense concept maps (batch, d_sae) + {dims} grid axes, got "
            f"{'sparse ' if codes.indices is not None else ''}codes of shape "
            f"{tuple(values.shape)}; pair it with a map encoder ('fno', 'lifted_fno', 'cnn') "
            f"of the same dimension"
        )
    return values
