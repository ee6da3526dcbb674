"""The plain SAE: encoder + sparsity + decoder composed from registry specs.

This is what ``load_sae`` returns and what the LightningModule trains. It depends only on the
three plugin protocols in :mod:`sae_lightning.components.base`; where a plugin takes the
optional fused path (``SparsityFn.fused_encode``), it is handed an affine encoder's weights and
encodes without the dense ``(batch, d_sae)`` pre-activations (see ``docs/architecture.md``,
"The sparse TopK hot path").
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from sae_lightning.components.base import (
    AuxSource,
    Codes,
    DeadLatents,
    Decoder,
    Encoder,
    SparsityFn,
    SparsityOutput,
)
from sae_lightning.config import PluginSpec
from sae_lightning.errors import ConfigError
from sae_lightning.functional import as_points, from_points
from sae_lightning.kernels.encode import EncoderInputs
from sae_lightning.registry import Registry, registry
from sae_lightning.spec import SAESpec


class ForwardOutput(NamedTuple):
    """Everything one training forward pass produces."""

    x_hat: Tensor
    """``(batch, d_in)`` reconstruction."""
    codes: Codes
    """Sparse latent activations."""
    pre_acts: Tensor | None
    """``(batch, d_sae)`` encoder output before the sparsity function; None when the fused
    sparse path ran, which never materialises it."""
    penalties: dict[str, Tensor]
    """Sparsity penalty terms, already weighted."""
    aux_source: AuxSource | None
    """What the sparsity plugin's auxiliary loss of this step needs (its ``aux_source``, else
    the pre-activations); :meth:`SparseAutoencoder.auxiliary_losses` hands it back."""


def channel_view(scale: Tensor, x: Tensor) -> Tensor:
    """``(C,)`` factors shaped to broadcast over dim 1 of ``x`` (``(batch, C, *grid)``)."""
    return scale.to(x.dtype).view(-1, *([1] * (x.ndim - 2)))


class SparseAutoencoder(nn.Module):
    """An SAE composed of registered plugins.

    Args:
        spec, named: the fields of :class:`~sae_lightning.spec.SAESpec`, positionally or by
            name: ``d_in`` (input width), ``d_sae`` (number of latents), and ``encoder``,
            ``decoder``, ``sparsity`` (recipe specs ``{"name": ..., **params}``).
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
        *spec: Any,
        field_prefix: str = "model",
        plugins: Registry | None = None,
        **named: Any,
    ) -> None:
        super().__init__()
        reg = plugins or registry
        d_in, d_sae, *plugin_specs = SAESpec(*spec, **named)
        self.spec = SAESpec(d_in, d_sae, *(dict(s) for s in plugin_specs))
        self.d_in = d_in
        self.d_sae = d_sae
        built: dict[str, Any] = {}
        for role, group, spec in self.spec.roles():
            context = {"encoder": built["encoder"]} if role == "decoder" else {}
            field = f"{field_prefix}.{role}"
            built[role] = reg.build(group, spec, field=field, d_in=d_in, d_sae=d_sae, **context)
        self.encoder: Encoder = built["encoder"]
        self.decoder: Decoder = built["decoder"]
        self.sparsity: SparsityFn = built["sparsity"]
        self.fused = True
        self.input_scale: Tensor | None
        self.register_buffer("input_scale", None)

    @classmethod
    def from_spec(cls, spec: SAESpec, **kwargs: Any) -> SparseAutoencoder:
        """The SAE of ``spec`` (``kwargs``: ``field_prefix``, ``plugins``)."""
        return cls(*spec, **kwargs)

    @property
    def specs(self) -> dict[str, PluginSpec]:
        """``{role: spec}`` of the three plugins."""
        return {role: spec for role, _, spec in self.spec.roles()}

    def set_input_scale(self, scale: Tensor | None) -> None:
        """Take raw inputs although training saw them multiplied by ``scale`` per channel.

        ``scale`` is ``(d_in,)``, one factor per input channel (dim 1 of a batch), as a data
        module that normalises each channel records it; None removes it. Every public method
        then multiplies its input by ``scale`` and divides reconstructions by it, so codes are
        those of training. Export sets it where the factors cannot be folded into the weights
        (function-space encoders); it is saved with the weights.
        """
        if scale is not None and scale.shape != (self.d_in,):
            raise ValueError(f"input_scale has shape {tuple(scale.shape)}, not ({self.d_in},)")
        self.input_scale = None if scale is None else scale.detach().clone()

    def _scaled(self, x: Tensor) -> Tensor:
        """``x`` in the space the SAE was trained in."""
        return x if self.input_scale is None else x * channel_view(self.input_scale, x)

    def _unscaled(self, x_hat: Tensor) -> Tensor:
        """A reconstruction back in the space of the raw inputs."""
        return x_hat if self.input_scale is None else x_hat / channel_view(self.input_scale, x_hat)

    def pre_activations(self, x: Tensor) -> Tensor:
        """``(batch, d_in) -> (batch, d_sae)`` encoder output, centring inputs if asked."""
        return self._pre_activations(self._scaled(x))

    def _pre_activations(self, x: Tensor) -> Tensor:
        if self.encoder.center_input:
            x = x - self.decoder.b_dec
        return self.encoder(x)

    def run(self, x: Tensor, *, step: int = 0, dead: DeadLatents | None = None) -> ForwardOutput:
        """Encode, sparsify and decode one batch, keeping every intermediate.

        Args:
            x: ``(batch, d_in)`` inputs.
            step: the global step (for step-dependent sparsity plugins).
            dead: the dead latents that :meth:`auxiliary_losses` of this step will get (the
                same mask tensor), when known now: a fused path then selects what the
                auxiliary loss needs from its own product (AuxK costs no second product).
        """
        out, pre_acts = self._sparsify(self._scaled(x), step, dead)
        source = out.aux_source if out.aux_source is not None else pre_acts
        x_hat = self._unscaled(self.decoder(out.codes))
        return ForwardOutput(x_hat, out.codes, pre_acts, out.losses, source)

    def _sparsify(
        self, x: Tensor, step: int, dead: DeadLatents | None = None
    ) -> tuple[SparsityOutput, Tensor | None]:
        """Codes of ``x`` by the fused path when available, else encoder then sparsity."""
        if self.fused and x.shape[0] > 0:
            # an encoder's own encode-and-select first, then the sparsity plugin's fused path
            own = self.encoder.fused_sparsify(x, self.sparsity, step=step, decoder=self.decoder)
            fused = own if own is not None else self._fused_encode(x, step, dead)
            if fused is not None:
                return fused, None
        pre_acts = self._pre_activations(x)
        if pre_acts.ndim > 2 and not self.sparsity.functional:
            return self._sparsify_pointwise(pre_acts, step), pre_acts
        return self.sparsity(pre_acts, step=step, decoder=self.decoder), pre_acts

    def _fused_encode(
        self, x: Tensor, step: int, dead: DeadLatents | None
    ) -> SparsityOutput | None:
        """The sparsity plugin's fused path on an affine encoder; None when either declines."""
        if not self.encoder.trains_through_affine:
            return None
        affine = self.encoder.affine()
        if affine is None:
            return None
        shift = self.decoder.b_dec if self.encoder.center_input else None
        inputs = EncoderInputs(x, shift, *affine)
        out = self.sparsity.fused_encode(inputs, step=step, decoder=self.decoder, dead=dead)
        if out is not None and out.codes.is_flat and not self.decoder.takes_flat_codes:
            out = out._replace(codes=out.codes.padded())  # a decoder that reads rows of pairs
        return out

    def _sparsify_pointwise(self, maps: Tensor, step: int) -> SparsityOutput:
        """Apply a vector sparsity plugin to concept maps, each grid point one row."""
        grid = tuple(maps.shape[2:])
        out = self.sparsity(as_points(maps), step=step, decoder=self.decoder)
        values = from_points(out.codes.dense(), maps.shape[0], grid)
        return SparsityOutput(Codes(values, None, self.d_sae), out.losses)

    def auxiliary_losses(
        self, source: AuxSource | None, x: Tensor, residual: Tensor, dead: Tensor
    ) -> dict[str, Tensor]:
        """The sparsity plugin's auxiliary terms (e.g. AuxK) for one batch.

        Args:
            source: ``ForwardOutput.aux_source`` of this batch's :meth:`run`.
            x, residual, dead: as for :meth:`SparsityFn.auxiliary_losses`.

        Raises:
            ConfigError: an auxiliary loss was asked of a point-wise plugin on concept maps,
                where it is not defined (AuxK decodes single latents at single points).
        """
        on_maps = isinstance(source, Tensor) and source.ndim > 2
        if on_maps and not self.sparsity.functional:
            switch = self.sparsity.auxiliary_loss_switch
            if switch is not None:
                raise ConfigError(
                    f"model.sparsity.{switch}",
                    "turns on an auxiliary loss, which is not defined for concept maps (the "
                    "encoder returns one function per latent)",
                    f"turn it off (model.sparsity.{switch}: 0)",
                )
            return {}
        return self.sparsity.auxiliary_losses(source, x, residual, self.decoder, dead)

    def encode_codes(self, x: Tensor) -> Codes:
        """Sparse codes of ``x`` (sparse or dense, whichever the sparsity plugin produces)."""
        return self._sparsify(self._scaled(x), 0)[0].codes

    def encode(self, x: Tensor) -> Tensor:
        """``(batch, d_in) -> (batch, d_sae)`` dense feature activations (concept maps
        ``(batch, d_sae, *grid)`` for function-space encoders that make them)."""
        return self.encode_codes(x).dense()

    def decode(self, features: Tensor | Codes) -> Tensor:
        """Reconstruct from dense ``(batch, d_sae)`` features or from :class:`Codes`."""
        if not isinstance(features, Codes):
            features = Codes(features, None, self.d_sae)
        return self._unscaled(self.decoder(features))

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of ``x``: any leading shape and last dim ``d_in``, or a function
        batch ``(batch, d_in, *grid)`` for a function-space encoder."""
        if self.encoder.functional:
            return self.decode(self.encode_codes(x))
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.d_in)
        return self.decode(self.encode_codes(flat)).reshape(*lead, self.d_in)

    def atoms(self) -> Tensor:
        """The ``(d_sae, d_in)`` dictionary."""
        return self.decoder.atoms()

    def config_dict(self) -> dict[str, Any]:
        """The specs that rebuild this SAE (see :func:`sae_lightning.io.load_sae`), and its
        per-channel input scale when one is set."""
        config = self.spec.as_kwargs()
        if self.input_scale is not None:
            config["input_scale"] = self.input_scale.tolist()
        return config

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        self.decoder.before_optimizer_step()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.decoder.after_optimizer_step()
