"""The expander decoder: decodes with the values and mask owned by the expander encoder."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sae_expander.encoder import ExpanderEncoder
from sae_expander.kernels import masked_decode_dense, masked_decode_sparse
from sae_lightning.components.base import Codes, Decoder, Encoder
from sae_lightning.config import PluginConfig
from sae_lightning.errors import ConfigError


class ExpanderDecoderConfig(PluginConfig):
    """No parameters: the degree ``d`` and the seed are set on the expander encoder."""


class ExpanderDecoder(Decoder[ExpanderDecoderConfig]):
    """Expander dictionary tied to the expander encoder: unit-norm d-sparse atoms, O(k d) decode."""

    def __init__(
        self, config: ExpanderDecoderConfig, *, d_in: int, d_sae: int, encoder: Encoder
    ) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae, encoder=encoder)
        if not isinstance(encoder, ExpanderEncoder):
            raise ConfigError(
                "name",
                "the 'expander' decoder shares the values and mask of the 'expander' encoder, "
                f"but the encoder is {type(encoder).__name__}",
                "set model.encoder to {name: expander, d: <degree>}",
            )
        # Hold the encoder without registering its parameters twice.
        self._encoder_ref = [encoder]
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    @property
    def expander(self) -> ExpanderEncoder:
        """The encoder that owns the compact dictionary."""
        return self._encoder_ref[0]

    def decode_without_bias(self, codes: Codes) -> Tensor:
        """``codes @ atoms()`` without building ``atoms()``; ``O(batch * k * d)`` when sparse."""
        enc = self.expander
        w = enc.normalized_values()
        if codes.indices is None:
            return masked_decode_dense(codes.values.to(w.dtype), w, enc.layout)
        return masked_decode_sparse(codes.values, codes.indices, w, enc.layout)

    def gather_pre_activations(self, pre_acts: Tensor, indices: Tensor) -> Tensor | None:
        """Selected pre-activations with an ``O(k d)`` gradient (used by ``signed_topk``)."""
        return self.expander.gather_pre_activations(pre_acts, indices)

    def atoms(self) -> Tensor:
        """The dense ``(d_sae, d_in)`` dictionary, for evaluation and export only."""
        return self.expander.dense_weight()

    def atom_norms(self) -> Tensor:
        return self.expander.values.new_ones(self.d_sae)

    def encode_omp(self, x: Tensor, k: int, *, signed: bool = True) -> Codes:
        """Sparse codes of ``x`` by orthogonal matching pursuit on this dictionary.

        See :func:`sae_expander.omp.encode_omp`; the correlation step uses the compact storage.
        """
        from sae_expander.omp import omp_compact

        return omp_compact(self, x, k, signed=signed)
