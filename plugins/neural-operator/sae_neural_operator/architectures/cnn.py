"""SAE-CNN: circular convolutions with kernels in grid units.

The baseline that is not discretisation-invariant: on another grid a kernel of ``K`` points covers
another part of the domain.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from sae_lightning.components.base import Codes, Encoder
from sae_lightning.config import PluginConfig
from sae_lightning.errors import ConfigError
from sae_neural_operator.architectures.common import (
    FunctionDecoder,
    FunctionDecoderConfig,
    FunctionEncoder,
    Modes,
    channel_vector,
    function_grid,
    map_codes,
    scale_rows_,
)


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


class CNNEncoder(FunctionEncoder[CNNEncoderConfig]):
    """SAE-CNN encoder: concept maps z_j = (w_j correlated with u) + b_j, kernel in grid units.

    ``pre_j[n] = sum_{c, m} W_enc[j, c, m] u_c[n + m - K//2] + b_enc[j]`` (indices mod N): a
    circular 'same' cross-correlation with a kernel of ``K`` grid points per axis. The kernel
    is defined in grid units, so on another grid it covers a different part of the domain:
    the baseline that is *not* discretisation-invariant. Kernels start as random unit vectors.
    Returns ``(B, p, *grid)``.
    """

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


class CNNDecoderConfig(FunctionDecoderConfig):
    kernel_size: Modes | None = Field(
        None,
        description="kernel size per grid axis, in grid points; default: the encoder's",
    )
    unit_norm: bool = Field(
        True,
        description="rescale every kernel to unit Euclidean norm after each optimizer step",
    )


class CNNDecoder(FunctionDecoder[CNNDecoderConfig]):
    """SAE-CNN decoder: u_hat = sum_j w_j * z_j + b_dec, a circular convolution in grid units.

    ``u_hat_c[n] = sum_{j, m} W_dec[j, c, m] z_j[n - (m - K//2)] + b_dec[c]`` (indices mod N):
    kernel value ``m`` sits at offset ``m - K//2`` from the code's point. Like the encoder it
    is defined in grid points, not on the domain, so it does not transfer across resolutions.
    ``atoms()`` are the kernels ``(p, C * prod(K))`` (``atom_norms`` their Euclidean norms);
    ``concept_functions(grid)`` the response to a unit-mass impulse (value ``|N|`` at the
    origin), i.e. ``|N| w_j`` placed at its offsets; unit norm applies to the kernel as a vector.
    """

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
        z = map_codes(codes, self.dims, self.kind)
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
        scale_rows_(self.W_dec, scale)
