"""JumpReLU (Rajamanoharan et al. 2024): learned per-latent thresholds trained for L0 directly.

``f = z * H(z - theta)`` with the L0 penalty ``lambda * sum_i H(z_i - theta_i)``. The step
function has no gradient, so theta gets a straight-through pseudo-gradient through a rectangle
kernel ``K(u) = 1[-1/2 < u < 1/2]`` of bandwidth ``eps``:

- ``d JumpReLU / d theta = -(theta / eps) K((z - theta) / eps)``;
  ``d JumpReLU / d z = H(z - theta)``
- ``d H / d theta = -(1 / eps) K((z - theta) / eps)``; no gradient to ``z`` through the step.

Under DDP the thresholds are parameters like any other: their gradients (local batch means) are
averaged over ranks, so every rank holds the same thresholds as one process would.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from sae_lightning.components.base import (
    Codes,
    Decoder,
    PeerActivation,
    SparsityFn,
    SparsityOutput,
    Touched,
)
from sae_lightning.components.sparsity.relu import warmup_factor
from sae_lightning.config import PluginConfig


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel 1[-1/2 < u < 1/2]."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """``z * H(z - theta)`` with the straight-through threshold gradient."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad * (z > theta).to(z.dtype)
        grad_theta = -(theta / eps) * rectangle((z - theta) / eps) * grad
        return grad_z, grad_theta.sum(dim=0), None


class StepFunction(torch.autograd.Function):
    """``H(z - theta)`` with the straight-through threshold gradient and none for ``z``."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        # In theta's precision (fp32 under bf16 autocast), so L0 counts stay exact.
        return (z > theta).to(torch.promote_types(z.dtype, theta.dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * rectangle((z - theta) / eps) * grad
        return torch.zeros_like(z), grad_theta.sum(dim=0), None


class JumpReLUConfig(PluginConfig):
    init_threshold: float = Field(0.001, gt=0, description="initial threshold of every latent")
    bandwidth: float = Field(
        0.001, gt=0, description="STE kernel width eps (0.001 for unit mean-squared-norm inputs)"
    )
    l0_coefficient: float = Field(1e-3, ge=0, description="weight lambda of the L0 penalty")
    warmup_steps: int = Field(
        0, ge=0, description="ramp the L0 coefficient linearly from 0 over this many steps"
    )


class JumpReLU(SparsityFn[JumpReLUConfig]):
    """JumpReLU: learned thresholds, straight-through (rectangle kernel) gradients, L0 penalty."""

    def __init__(self, config: JumpReLUConfig, *, d_in: int, d_sae: int) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae)
        # Stored as log(theta) so thresholds stay positive (as SAELens does).
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(config.init_threshold)))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def forward(self, pre_acts: Tensor, *, step: int, decoder: Decoder) -> SparsityOutput:
        theta = self.threshold
        eps = self.config.bandwidth
        acts = JumpReLUFunction.apply(pre_acts, theta, eps)
        l0 = StepFunction.apply(pre_acts, theta, eps).sum(dim=1).mean()
        coeff = self.config.l0_coefficient * warmup_factor(step, self.config.warmup_steps)
        return SparsityOutput(Codes(acts, None, self.d_sae), {"l0": coeff * l0})

    @torch.no_grad()
    def resample_latents(self, ids: Tensor) -> list[Touched]:
        """Resampled latents start again from ``init_threshold``."""
        self.log_threshold[ids] = math.log(self.config.init_threshold)
        return [Touched(self.log_threshold, ids)]

    def peer_activation(self) -> PeerActivation:
        """SAELens ``jumprelu`` with these per-latent thresholds."""
        return PeerActivation("jumprelu", threshold=self.threshold.detach().float().cpu())
