"""Soft thresholding: ReLU(z - lambda), the proximal operator of the L1 norm.

This is the template for a third-party sparsity plugin: a pydantic ``Config``, a class that
implements :class:`sae_lightning.components.base.SparsityFn`, and one entry point in
``pyproject.toml``. Nothing in the core knows it exists. It also declares its SAELens
equivalent (:meth:`SoftThreshold.peer_activation`), so it exports to that format.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from sae_lightning.components.base import (
    Codes,
    Decoder,
    PeerActivation,
    SparsityFn,
    SparsityOutput,
)
from sae_lightning.config import PluginConfig


class SoftThresholdConfig(PluginConfig):
    threshold: float = Field(0.1, ge=0, description="amount subtracted before the ReLU")
    l1_coefficient: float = Field(0.0, ge=0, description="optional L1 penalty on the codes")


class SoftThreshold(SparsityFn[SoftThresholdConfig]):
    """Soft thresholding ReLU(z - threshold), optionally with an L1 penalty."""

    def forward(self, pre_acts: Tensor, *, step: int, decoder: Decoder) -> SparsityOutput:
        acts = torch.relu(pre_acts - self.config.threshold)  # (batch, d_sae)
        losses = {}
        if self.config.l1_coefficient > 0:
            losses["l1"] = self.config.l1_coefficient * acts.sum(dim=1).mean()
        return SparsityOutput(Codes(acts, None, self.d_sae), losses)

    def peer_activation(self) -> PeerActivation:
        """``ReLU(z - t)`` is SAELens ``standard`` (ReLU) with ``t`` taken off the encoder bias."""
        return PeerActivation("relu", bias_shift=-self.config.threshold)
