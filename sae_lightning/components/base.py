"""The three plugin protocols an SAE is composed of, and the values that flow between them.

Data flows one way: ``x -> Encoder -> pre-activations -> SparsityFn -> Codes -> Decoder -> x_hat``.
The module only calls the methods defined here; it never checks a plugin's concrete class.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_lightning.config import PluginConfig


class Codes(NamedTuple):
    """Latent activations, dense or as ``k`` (index, value) pairs per row.

    Sparse codes let decoders gather ``k`` dictionary rows instead of multiplying by a dense
    ``(batch, d_sae)`` matrix that is mostly zeros.
    """

    values: Tensor
    """``(batch, k)`` when sparse, ``(batch, d_sae)`` when dense; zero means inactive."""
    indices: Tensor | None
    """``(batch, k)`` latent ids of ``values`` when sparse; None when dense."""
    d_sae: int
    """Number of latents."""

    @property
    def is_sparse(self) -> bool:
        return self.indices is not None

    def dense(self) -> Tensor:
        """The ``(batch, d_sae)`` activation matrix."""
        if self.indices is None:
            return self.values
        out = self.values.new_zeros(self.values.shape[0], self.d_sae)
        return out.scatter_add(1, self.indices, self.values)

    def l0(self) -> Tensor:
        """``(batch,)`` number of nonzero latents per row."""
        return (self.values != 0).sum(dim=1)

    def fire_counts(self) -> Tensor:
        """``(d_sae,)`` how many rows each latent was nonzero in."""
        if self.indices is None:
            return (self.values != 0).sum(dim=0)
        counts = torch.zeros(self.d_sae, dtype=torch.long, device=self.values.device)
        active = (self.values != 0).long()
        return counts.scatter_add_(0, self.indices.reshape(-1), active.reshape(-1))

    def l1(self) -> Tensor:
        """``(batch,)`` L1 norm of each row's activations."""
        return self.values.abs().sum(dim=1)


class SparsityOutput(NamedTuple):
    """What a sparsity function returns for one batch."""

    codes: Codes
    """The sparse latent activations."""
    losses: dict[str, Tensor]
    """Penalty terms already multiplied by their coefficients; each is added to the loss."""


class Plugin:
    """Mixin of every plugin: a pydantic ``Config`` and a one-line docstring description."""

    Config: ClassVar[type[PluginConfig]] = PluginConfig

    @classmethod
    def describe(cls) -> str:
        doc = (cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else cls.__name__


class Encoder(Plugin, nn.Module):
    """Maps inputs ``(batch, d_in)`` to pre-activations ``(batch, d_sae)``.

    Attributes:
        center_input: when True the module subtracts the decoder bias before encoding.
    """

    center_input: bool = False

    def __init__(self, config: PluginConfig, *, d_in: int, d_sae: int) -> None:
        super().__init__()
        self.config = config
        self.d_in = d_in
        self.d_sae = d_sae

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - protocol
        raise NotImplementedError

    def weight(self) -> Tensor | None:
        """The ``(d_sae, d_in)`` encoder matrix when the encoder is linear, else None."""
        return None


class Decoder(Plugin, nn.Module):
    """Maps codes to reconstructions ``(batch, d_in)`` through a dictionary of ``d_sae`` atoms.

    Attributes:
        b_dec: ``(d_in,)`` output bias, also used to centre inputs for encoders that ask.
    """

    b_dec: nn.Parameter

    def __init__(self, config: PluginConfig, *, d_in: int, d_sae: int, encoder: Encoder) -> None:
        super().__init__()
        self.config = config
        self.d_in = d_in
        self.d_sae = d_sae

    def forward(self, codes: Codes) -> Tensor:
        """Reconstruct: ``codes @ atoms() + b_dec``."""
        return self.decode_without_bias(codes) + self.b_dec

    def decode_without_bias(self, codes: Codes) -> Tensor:
        """``codes @ atoms()``, gathering only active rows when the codes are sparse."""
        atoms = self.atoms()
        if codes.indices is None:
            return codes.values @ atoms
        # (batch, k) ids and weights -> (batch, d_in), a gather-and-sum over k atom rows.
        return F.embedding_bag(
            codes.indices, atoms, per_sample_weights=codes.values.to(atoms.dtype), mode="sum"
        )

    def atoms(self) -> Tensor:  # pragma: no cover - protocol
        """The ``(d_sae, d_in)`` dictionary, one atom (feature direction) per row."""
        raise NotImplementedError

    def atom_norms(self) -> Tensor:
        """``(d_sae,)`` L2 norm of each atom."""
        return self.atoms().norm(dim=1)

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Adjust gradients before the optimizer step (e.g. project out radial components)."""

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Restore constraints after the optimizer step (e.g. unit-norm atoms)."""


class SparsityFn(Plugin, nn.Module):
    """Turns pre-activations into sparse codes plus penalty terms."""

    def __init__(self, config: PluginConfig, *, d_in: int, d_sae: int) -> None:
        super().__init__()
        self.config = config
        self.d_in = d_in
        self.d_sae = d_sae

    def forward(self, pre_acts: Tensor, *, step: int, decoder: Decoder) -> SparsityOutput:
        raise NotImplementedError  # pragma: no cover - protocol

    def auxiliary_losses(
        self, pre_acts: Tensor, x: Tensor, residual: Tensor, decoder: Decoder, dead: Tensor
    ) -> dict[str, Tensor]:
        """Extra loss terms that need the reconstruction (e.g. AuxK for dead latents).

        Args:
            pre_acts: ``(batch, d_sae)`` encoder output.
            x: ``(batch, d_in)`` the input batch.
            residual: ``(batch, d_in)`` ``x - x_hat`` with ``x_hat`` detached.
            decoder: the decoder, to decode auxiliary codes.
            dead: ``(d_sae,)`` bool mask of latents that have not fired recently.
        """
        return {}
