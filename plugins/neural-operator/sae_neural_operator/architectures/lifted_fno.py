"""L-SAE-FNO: the SAE-FNO with a pointwise lifting ``P`` and a pointwise projection ``Q``."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from sae_lightning.components.base import Encoder
from sae_neural_operator.architectures.common import (
    FunctionDecoder,
    FunctionEncoder,
    lifting_width,
    orthonormal_lifting,
    transposed_lifting,
)
from sae_neural_operator.architectures.fno import (
    FNODecoder,
    FNODecoderConfig,
    FNOEncoder,
    FNOEncoderConfig,
)


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
        q = transposed_lifting(encoder, h, d_in)
        if matched is not None and q is not None:
            self._load_spectral(matched)
        else:
            q = orthonormal_lifting(h, d_in).t()
        self.Q = nn.Parameter(q)  # (C, h)
        self._normalise()

    def _project(self, v: Tensor) -> Tensor:
        return torch.einsum("ch,bh...->bc...", self.Q.to(v.dtype), v)  # (B, h, ...) -> (B, C, ...)
