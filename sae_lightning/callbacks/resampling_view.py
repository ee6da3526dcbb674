"""What the resampler reads and writes of one SAE, for an SAE held whole or split in shards.

:class:`~sae_lightning.callbacks.resampling.DeadFeatureResampler` chooses latents and
directions through a :class:`ResamplingView`: the dead mask and encoder row norms over all
latents, reconstructions of the candidate inputs, each input's smallest active code, and the
rewrite of the chosen latents with their optimizer state. :class:`LocalView` is the SAE of one
process (or of every DDP rank, identical); a module that shards its latents returns its own view
from ``resampling_view()`` (:class:`ProvidesResamplingView`), whose reads are collectives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from sae_lightning.callbacks.resampling_init import (
    encode_values,
    reconstruct,
    reset_optimizer_state,
)

if TYPE_CHECKING:
    from sae_lightning.module import SAEModule


class NewLatents(NamedTuple):
    """One resample of one SAE: latents ``ids`` get encoder rows ``directions * norm``, atoms
    ``directions`` and a zero encoder bias."""

    ids: Tensor
    """``(n,)`` global latent ids, the same on every rank."""
    directions: Tensor
    """``(n, d_in)`` unit-norm directions."""
    norm: Tensor
    """The new encoder rows' norm, a scalar or ``(n, 1)``."""


class StateReset(NamedTuple):
    """How the optimizer state of resampled latents restarts."""

    optimizers: list[torch.optim.Optimizer]
    """The trainer's optimizers; the one holding each parameter is reset."""
    second_moment: Literal["zero", "live_mean"] = "zero"
    """``zero``, or ``live_mean`` (see :func:`~.resampling_init.reset_optimizer_state`)."""


class ResamplingView(Protocol):
    """One SAE as the resampler sees it; every tensor covers all ``d_sae`` latents."""

    collective: bool
    """Whether the methods hold collectives: then every rank calls them, in the same order."""

    @property
    def d_in(self) -> int: ...

    def dead_mask(self, window_tokens: int | None) -> Tensor:
        """``(d_sae,)`` bool: not fired within ``window_tokens`` (None: the model's window)."""
        ...

    def row_norms(self) -> Tensor:
        """``(d_sae,)`` encoder row norms."""
        ...

    def reconstruct(self, x: Tensor) -> Tensor:
        """``(n, d_in)`` the SAE's reconstruction of ``x`` in eval mode."""
        ...

    def smallest_active(self, x: Tensor) -> Tensor:
        """``(n,)`` each row's smallest active code value (its top-k threshold); 0 if none."""
        ...

    def encoder_input(self, x: Tensor) -> Tensor:
        """``x`` as the encoder sees it (centred by the decoder bias when it centres)."""
        ...

    def resample(self, new: NewLatents, reset: StateReset) -> None:
        """Rewrite the latents of ``new`` and reset their optimizer state (see ``SAEModule``'s
        ``resample_latents`` and :func:`~.resampling_init.reset_optimizer_state`)."""
        ...


@runtime_checkable
class ProvidesResamplingView(Protocol):
    """A module with a view of its own (the latent-sharded module)."""

    def resampling_view(self) -> ResamplingView: ...


class LocalView:
    """The view of an SAE held whole by this process: no collective."""

    collective = False

    def __init__(self, member: SAEModule) -> None:
        self.member = member

    @property
    def d_in(self) -> int:
        return self.member.sae.d_in

    def dead_mask(self, window_tokens: int | None) -> Tensor:
        return self.member.dead_mask(window_tokens)

    def row_norms(self) -> Tensor:
        norms = self.member.sae.encoder.row_norms()
        assert norms is not None, "the resampler's setup checks for an affine encoder"
        return norms.float()

    def reconstruct(self, x: Tensor) -> Tensor:
        return reconstruct(self.member.sae, x)

    def smallest_active(self, x: Tensor) -> Tensor:
        values = encode_values(self.member.sae, x)  # (n, k) or (n, d_sae)
        active = values.masked_fill(values == 0, float("inf")).min(dim=1).values
        return torch.where(torch.isfinite(active), active, 0.0)

    def encoder_input(self, x: Tensor) -> Tensor:
        sae = self.member.sae
        return x - sae.decoder.b_dec if sae.encoder.center_input else x

    def resample(self, new: NewLatents, reset: StateReset) -> None:
        touched = self.member.resample_latents(*new)
        reset_optimizer_state(reset.optimizers, touched, second_moment=reset.second_moment)


def resampling_view(member: SAEModule) -> ResamplingView:
    """The member's own view when it declares one, else :class:`LocalView`."""
    if isinstance(member, ProvidesResamplingView):
        return member.resampling_view()
    return LocalView(member)
