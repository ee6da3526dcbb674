"""The plain SAE: encoder + sparsity + decoder composed from registry specs.

This is what ``load_sae`` returns and what the LightningModule trains. It depends only on the
three plugin protocols in :mod:`sae_lightning.components.base`, plus one optional method: a
sparsity plugin with ``fused_encode`` is handed a linear encoder's weights and encodes without
the dense ``(batch, d_sae)`` pre-activations (see ``docs/architecture.md``, "The sparse TopK
hot path").
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from sae_lightning.components.base import Codes, Decoder, Encoder, SparsityFn, SparsityOutput
from sae_lightning.config import PluginSpec
from sae_lightning.errors import ConfigError
from sae_lightning.functional import as_points, from_points
from sae_lightning.kernels.topk_encoder import EncoderInputs
from sae_lightning.registry import Registry, registry


class ForwardOutput(NamedTuple):
    """Everything one training forward pass produces."""

    x_hat: Tensor
    """``(batch, d_in)`` reconstruction."""
    codes: Codes
    """Sparse latent activations."""
    pre_acts: Tensor | None
    """``(batch, d_sae)`` encoder output before the sparsity function; None when the fused
    sparse path ran, which never materialises it (``sparsity.auxiliary_losses`` then uses what
    the plugin's ``fused_encode`` kept)."""
    penalties: dict[str, Tensor]
    """Sparsity penalty terms, already weighted."""


class SparseAutoencoder(nn.Module):
    """An SAE composed of registered plugins.

    Args:
        d_in: input width.
        d_sae: number of latents.
        encoder, decoder, sparsity: recipe specs ``{"name": ..., **params}``.
        field_prefix: where the specs live in the recipe, for error messages.
        plugins: the registry to build from (the process-wide one by default).

    Attributes:
        fused: use the encoder's ``fused_sparsify`` when it returns codes, else the sparsity
            plugin's ``fused_encode`` when it has one and the encoder is linear (True by
            default); False forces the dense reference path.

    Example::

        sae = SparseAutoencoder(64, 512, {"name": "linear"}, {"name": "linear"},
                                {"name": "topk", "k": 8})
        x_hat = sae(torch.randn(4, 64))
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        encoder: PluginSpec,
        decoder: PluginSpec,
        sparsity: PluginSpec,
        *,
        field_prefix: str = "model",
        plugins: Registry | None = None,
    ) -> None:
        super().__init__()
        reg = plugins or registry
        self.d_in = d_in
        self.d_sae = d_sae
        self.specs: dict[str, PluginSpec] = {
            "encoder": dict(encoder),
            "decoder": dict(decoder),
            "sparsity": dict(sparsity),
        }
        self.encoder: Encoder = reg.build(
            "encoders", encoder, field=f"{field_prefix}.encoder", d_in=d_in, d_sae=d_sae
        )
        self.decoder: Decoder = reg.build(
            "decoders",
            decoder,
            field=f"{field_prefix}.decoder",
            d_in=d_in,
            d_sae=d_sae,
            encoder=self.encoder,
        )
        self.sparsity: SparsityFn = reg.build(
            "sparsity", sparsity, field=f"{field_prefix}.sparsity", d_in=d_in, d_sae=d_sae
        )
        self.fused = True

    def pre_activations(self, x: Tensor) -> Tensor:
        """``(batch, d_in) -> (batch, d_sae)`` encoder output, centring inputs if asked."""
        if self.encoder.center_input:
            x = x - self.decoder.b_dec
        return self.encoder(x)

    def run(self, x: Tensor, *, step: int = 0) -> ForwardOutput:
        """Encode, sparsify and decode one batch, keeping every intermediate."""
        (codes, penalties), pre_acts = self._sparsify(x, step)
        return ForwardOutput(self.decoder(codes), codes, pre_acts, penalties)

    def _sparsify(self, x: Tensor, step: int) -> tuple[SparsityOutput, Tensor | None]:
        """Codes of ``x`` by the fused path when available, else encoder then sparsity."""
        if self.fused and x.shape[0] > 0:  # an encoder's own encode-and-select, if it has one
            own = self.encoder.fused_sparsify(x, self.sparsity, step=step, decoder=self.decoder)
            if own is not None:
                return own, None
        fused_encode = getattr(self.sparsity, "fused_encode", None)
        if self.fused and fused_encode is not None and x.shape[0] > 0:
            affine = _affine_weights(self.encoder)
            if affine is not None:
                shift = self.decoder.b_dec if self.encoder.center_input else None
                inputs = EncoderInputs(x, shift, *affine)
                out = fused_encode(inputs, step=step, decoder=self.decoder)
                if out is not None:  # a plugin may decline (e.g. in a mode it cannot fuse)
                    return out
        pre_acts = self.pre_activations(x)
        if pre_acts.ndim > 2 and not getattr(self.sparsity, "functional", False):
            return self._sparsify_pointwise(pre_acts, step), pre_acts
        return self.sparsity(pre_acts, step=step, decoder=self.decoder), pre_acts

    def _sparsify_pointwise(self, maps: Tensor, step: int) -> SparsityOutput:
        """Apply a vector sparsity plugin to concept maps, each grid point one row."""
        grid = tuple(maps.shape[2:])
        codes, losses = self.sparsity(as_points(maps), step=step, decoder=self.decoder)
        values = from_points(codes.dense(), maps.shape[0], grid)
        return SparsityOutput(Codes(values, None, self.d_sae), losses)

    def auxiliary_losses(
        self, pre_acts: Tensor | None, x: Tensor, residual: Tensor, dead: Tensor
    ) -> dict[str, Tensor]:
        """The sparsity plugin's auxiliary terms (e.g. AuxK) for one batch.

        Raises:
            ConfigError: an auxiliary loss was asked of a point-wise plugin on concept maps,
                where it is not defined (AuxK decodes single latents at single points).
        """
        if (
            pre_acts is not None
            and pre_acts.ndim > 2
            and not getattr(self.sparsity, "functional", False)
        ):
            if getattr(self.sparsity.config, "aux_coefficient", 0) > 0:
                raise ConfigError(
                    "model.sparsity.aux_coefficient",
                    f"is {self.sparsity.config.aux_coefficient}, but the AuxK loss is not "
                    "defined for concept maps (the encoder returns one function per latent)",
                    "set model.sparsity.aux_coefficient: 0",
                )
            return {}
        return self.sparsity.auxiliary_losses(pre_acts, x, residual, self.decoder, dead)

    def encode_codes(self, x: Tensor) -> Codes:
        """Sparse codes of ``x`` (sparse or dense, whichever the sparsity plugin produces)."""
        return self._sparsify(x, 0)[0].codes

    def encode(self, x: Tensor) -> Tensor:
        """``(batch, d_in) -> (batch, d_sae)`` dense feature activations (concept maps
        ``(batch, d_sae, *grid)`` for function-space encoders that make them)."""
        return self.encode_codes(x).dense()

    def decode(self, features: Tensor | Codes) -> Tensor:
        """Reconstruct from dense ``(batch, d_sae)`` features or from :class:`Codes`."""
        if not isinstance(features, Codes):
            features = Codes(features, None, self.d_sae)
        return self.decoder(features)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of ``x``: any leading shape and last dim ``d_in``, or a function
        batch ``(batch, d_in, *grid)`` for a function-space encoder."""
        if getattr(self.encoder, "functional", False):
            return self.decoder(self.encode_codes(x))
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.d_in)
        return self.decoder(self.encode_codes(flat)).reshape(*lead, self.d_in)

    def atoms(self) -> Tensor:
        """The ``(d_sae, d_in)`` dictionary."""
        return self.decoder.atoms()

    def config_dict(self) -> dict[str, Any]:
        """The specs that rebuild this SAE (see :func:`sae_lightning.io.load_sae`)."""
        return {"d_in": self.d_in, "d_sae": self.d_sae, **self.specs}

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        self.decoder.before_optimizer_step()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.decoder.after_optimizer_step()


def _affine_weights(encoder: Encoder) -> tuple[Tensor, Tensor] | None:
    """``(W_enc, b_enc)`` when ``encoder(x) == x @ W_enc.T + b_enc``, else None.

    ``Encoder.weight()`` is documented to be non-None only for a linear encoder; the bias is
    its ``b_enc`` parameter. An encoder without one takes the dense path.
    """
    weight = encoder.weight()
    bias = getattr(encoder, "b_enc", None)
    if weight is None or not isinstance(bias, Tensor) or bias.shape != weight.shape[:1]:
        return None
    return weight, bias
