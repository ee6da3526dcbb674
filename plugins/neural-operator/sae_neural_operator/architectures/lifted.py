"""L-SAE: the SAE-MLP with a learned lifting ``P`` (encoder) and projection ``Q`` (decoder)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from sae_lightning.components.base import Codes, Encoder
from sae_lightning.config import PluginConfig
from sae_neural_operator.architectures.common import (
    FlatFunctionDecoder,
    FlatFunctionEncoder,
    FunctionDecoderConfig,
    Grid,
    lifting_width,
    orthonormal_lifting,
    transposed_lifting,
    unit_functions,
)


class LiftedEncoderConfig(PluginConfig):
    grid: Grid = Field(
        description="the fixed grid the SAE is trained at, e.g. [64]; the model runs only there"
    )
    lifting_width: int | None = Field(
        None,
        ge=1,
        description="h, the lifted dimension (>= m = d_in * prod(grid)); default 2 m",
    )


class LiftedEncoder(FlatFunctionEncoder[LiftedEncoderConfig]):
    """L-SAE encoder: z = W_e P x + b_e with a learned lifting P (h x m, h >= m).

    ``x = vec(u)`` in ``R^m`` (``m = C |N|``), ``pre = w W_enc (P x) + b_enc`` with
    ``P`` ``(h, m)`` and ``W_enc`` ``(p, h)``. The effective encoder ``W_enc P`` is an arbitrary
    ``p x m`` matrix, so the function class is the SAE-MLP's; the factorisation changes only
    the optimisation geometry (gradient descent on ``(W_enc, P)`` acts on ``W_enc P`` through a
    preconditioner, which is the paper's claim for lifting). ``P`` starts with orthonormal
    columns and ``W_enc = E P^T`` with ``E`` random unit-norm encoder functions, so that the
    effective encoder starts as exactly an SAE-MLP's (``W_enc P = E``).
    """

    kind = "lifted"

    def __init__(self, config: LiftedEncoderConfig, *, d_in: int, d_sae: int) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae)
        self.lifting_width = lifting_width(config.lifting_width, self.flat_dim)
        p_mat = orthonormal_lifting(self.lifting_width, self.flat_dim)  # (h, m)
        e = unit_functions(d_sae, self.grid, d_in)
        self.P = nn.Parameter(p_mat)
        self.W_enc = nn.Parameter(e @ p_mat.t())  # (p, h)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))

    def effective_weight(self) -> Tensor:
        """``(p, m)`` the product ``W_enc P``: the encoder functions, flattened."""
        return self.W_enc @ self.P

    def _lift(self, x: Tensor) -> Tensor:
        return x @ self.P.t()  # (B, h)


class LiftedDecoderConfig(FunctionDecoderConfig):
    grid: Grid | None = Field(
        None, description="the training grid, e.g. [64]; default: the encoder's grid"
    )
    lifting_width: int | None = Field(
        None,
        ge=1,
        description="h (>= m = d_in * prod(grid)); default: the encoder's, else 2 m",
    )


class LiftedDecoder(FlatFunctionDecoder[LiftedDecoderConfig]):
    """L-SAE decoder: u_hat = Q W_d z + b_dec with a learned projection Q (m x h).

    ``W_dec`` ``(h, p)`` and ``Q`` ``(m, h)``: concept ``j``'s function is column ``j`` of the
    product ``Q W_dec`` (reshaped to ``(C, *grid)``), an arbitrary ``m x p`` dictionary, so the
    function class is the SAE-MLP's. Initialised from a lifted encoder as its transpose
    (``Q = P^T``, ``Q W_dec = (W_enc P)^T`` normalised); unit norm applies to ``Q W_dec``.
    """

    kind = "lifted"

    def __init__(
        self, config: LiftedDecoderConfig, *, d_in: int, d_sae: int, encoder: Encoder
    ) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae, encoder=encoder)
        m = self.flat_dim
        h = lifting_width(config.lifting_width, m, getattr(encoder, "lifting_width", None))
        self.lifting_width = h
        q = transposed_lifting(encoder, h, m) if config.init_from_encoder else None
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
