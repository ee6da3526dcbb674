"""Activation statistics, the input scale factor, outlier handling, and folding the scale away.

LM activations have norms in the tens or hundreds and a few tokens (BOS, attention sinks) far
larger. The DataModule multiplies every activation by one scale factor ``s`` estimated on a
fixed sample, so hyperparameters transfer between models and layers, and clips or drops rows
whose norm is over ``N x median``. An SAE trained on ``s x`` is turned into one that takes and
returns raw activations by :func:`fold_input_scale` (SAELens' convention: the feature
activations stay the same, only the encoder and decoder weights change).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from sae_lightning.errors import ConfigError

if TYPE_CHECKING:
    from sae_lightning.sae import SparseAutoencoder

NormalizeMode = Literal["none", "unit", "sqrt_d_in"]
"""``unit``: mean squared norm 1; ``sqrt_d_in``: mean norm sqrt(d_in), as SAELens does."""
OutlierAction = Literal["clip", "drop"]


@dataclass(frozen=True)
class NormStats:
    """Norm statistics of a sample of activations (float64, raw scale)."""

    tokens: int
    mean_squared_norm: float
    mean_norm: float
    median_norm: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> NormStats:
        return cls(
            int(data["tokens"]),
            float(data["mean_squared_norm"]),
            float(data["mean_norm"]),
            float(data["median_norm"]),
        )


def norm_stats(x: Tensor) -> NormStats:
    """Statistics of the ``(n, d)`` sample ``x``."""
    norms = x.double().norm(dim=1)
    return NormStats(
        tokens=int(x.shape[0]),
        mean_squared_norm=float(norms.pow(2).mean()),
        mean_norm=float(norms.mean()),
        median_norm=float(norms.median()),
    )


def scale_factor(stats: NormStats, mode: NormalizeMode, d_in: int) -> float:
    """The factor ``s`` the activations are multiplied by before the SAE sees them."""
    if mode == "none":
        return 1.0
    if mode == "unit":
        return 1.0 / math.sqrt(max(stats.mean_squared_norm, 1e-30))
    return math.sqrt(d_in) / max(stats.mean_norm, 1e-30)


class ActivationTransform:
    """Raw activations -> what the SAE trains on: outliers clipped or dropped, then scaled.

    Args:
        scale: the factor ``s``.
        max_norm: rows with a larger (raw) norm are clipped to it or dropped; None: keep all.
        action: ``clip`` rescales such rows to ``max_norm``; ``drop`` removes them.
    """

    def __init__(self, scale: float, max_norm: float | None, action: OutlierAction) -> None:
        self.scale = scale
        self.max_norm = max_norm
        self.action = action

    def __call__(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.max_norm is not None:
            norms = x.norm(dim=1, keepdim=True)  # (n, 1)
            if self.action == "drop":
                x = x[norms.squeeze(1) <= self.max_norm]
            else:
                x = x * (self.max_norm / norms.clamp_min(self.max_norm))
        return x * self.scale if self.scale != 1.0 else x


@torch.no_grad()
def fold_input_scale(sae: nn.Module, scale: float) -> nn.Module:
    """A copy of ``sae`` that computes ``sae(scale * x) / scale`` with the same feature values.

    With ``x' = s x``: ``W_enc x' = (s W_enc) x`` and ``(W_dec^T f + b_dec) / s`` uses
    ``W_dec / s`` and ``b_dec / s``; an encoder that centres its input by ``b_dec`` sees
    ``s x - b_dec = s (x - b_dec / s)``, so the same folded ``b_dec`` serves both.

    Args:
        sae: a :class:`~sae_lightning.sae.SparseAutoencoder` whose encoder's ``affine()`` weight
            and decoder's ``atoms()`` are parameters of their own (linear encoder and decoder).
        scale: the factor the training activations were multiplied by.

    Raises:
        ConfigError: the decoder shares the encoder's weights (``tied``), so the two cannot
            be rescaled independently.
    """
    if scale == 1.0:
        return copy.deepcopy(sae)
    encoder, decoder = sae.encoder, sae.decoder
    affine = encoder.affine() if encoder.trains_through_affine else None
    w_enc = None if affine is None else affine[0]
    w_dec = decoder.atoms()
    if not isinstance(w_enc, nn.Parameter) or not isinstance(w_dec, nn.Parameter):
        raise ConfigError(
            "data.normalize",
            f"cannot fold the input scale into encoder {type(encoder).__name__} and decoder "
            f"{type(decoder).__name__}: folding needs separate W_enc and W_dec matrices",
            "use the linear encoder and decoder, or set data.normalize: none",
        )
    folded = copy.deepcopy(sae)
    folded.encoder.affine()[0].mul_(scale)
    folded.decoder.atoms().div_(scale)
    folded.decoder.b_dec.div_(scale)
    return folded


def raw_input_sae(sae: SparseAutoencoder, data: Any) -> tuple[SparseAutoencoder, dict[str, float]]:
    """The SAE to export, taking the raw inputs of a data module that normalises them.

    A scalar ``scale`` is folded into the weights (recorded as ``input_scale``); per-channel
    factors (``channel_scale``, e.g. ``pde_fields`` with ``normalize: unit``) are kept by the
    SAE itself (:meth:`~sae_lightning.sae.SparseAutoencoder.set_input_scale`), which
    records them in its config.
    """
    from sae_lightning.protocols import ScalesChannels, ScalesInputs

    channels = data.channel_scale if isinstance(data, ScalesChannels) else None
    if channels is not None and not bool((channels == 1).all()):
        sae = copy.deepcopy(sae)
        sae.set_input_scale(channels.to(next(sae.parameters()).dtype))
        return sae, {}
    scale = float(data.scale) if isinstance(data, ScalesInputs) else 1.0
    return (fold_input_scale(sae, scale) if scale != 1.0 else sae), {"input_scale": scale}
