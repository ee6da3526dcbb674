"""The expander encoder: owns the compact dictionary (values + row indices) the decoder shares.

Why the encoder owns it: the registry builds the encoder first and hands it to the decoder, and
the paper ties them (``W_enc = W_decᵀ``), so one module holds the ``(d_sae, d)`` values and both
products read them. Columns are unit-norm by construction, ``W = V / ‖V‖`` (clamped at 1e-8).
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from sae_expander.kernels import MaskLayout, masked_encode, selected_pre_activations
from sae_expander.mask import check_mask_shape, sample_mask
from sae_lightning.components.base import Decoder, Encoder, SparsityFn, SparsityOutput
from sae_lightning.config import PluginConfig
from sae_lightning.errors import SaeLightningError


class ExpanderEncoderConfig(PluginConfig):
    d: int = Field(
        16,
        gt=0,
        description="input dimensions each latent touches (the mask degree); the dictionary "
        "stores d * d_sae values instead of d_in * d_sae",
    )
    seed: int = Field(
        0,
        ge=0,
        description="the mask (generator seed + 10000) and the initial values (seed) depend on "
        "this seed and the shape alone",
    )
    center_input: bool = Field(
        True, description="subtract the decoder bias b_dec before encoding (as the paper does)"
    )


class ExpanderEncoder(Encoder[ExpanderEncoderConfig]):
    """Expander-masked tied encoder: each latent reads d inputs; pair it with decoder 'expander'."""

    def __init__(self, config: ExpanderEncoderConfig, *, d_in: int, d_sae: int) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae)
        check_mask_shape(d_in, d_sae, config.d)
        self.center_input = config.center_input
        rows = sample_mask(d_in, d_sae, config.d, config.seed)  # (d_sae, d)
        gen = torch.Generator().manual_seed(config.seed)
        # Paper init: V ~ N(0, 1) / sqrt(d); only the direction matters after normalisation.
        self.values = nn.Parameter(
            torch.randn(d_sae, config.d, generator=gen) / math.sqrt(config.d)
        )
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        # int32 halves the stored indices (d_in < 2**31); the int64 copies below are derived.
        self.register_buffer("indices", rows.to(torch.int32))
        self._set_layout(rows)
        self.register_load_state_dict_post_hook(_rebuild_layout_after_load)
        self._last: tuple[weakref.ref[Tensor], weakref.ref[Tensor]] = (_dead_ref, _dead_ref)

    def _set_layout(self, rows: Tensor) -> None:
        layout = MaskLayout.from_rows(rows, self.d_in)
        device = self.values.device
        for name in ("rows", "by_input_latent", "by_input_slot", "by_input_offsets", "bags"):
            self.register_buffer(f"_{name}", getattr(layout, name).to(device), persistent=False)

    @property
    def layout(self) -> MaskLayout:
        """The mask in both orientations, for the kernels."""
        return MaskLayout(
            self._rows,
            self._by_input_latent,
            self._by_input_slot,
            self._by_input_offsets,
            self._bags,
            self.d_in,
        )

    def normalized_values(self) -> Tensor:
        """``(d_sae, d)`` values of the unit-norm atoms, ``V / ‖V‖`` per latent."""
        return self.values / self.values.norm(dim=1, keepdim=True).clamp_min(1e-8)

    def forward(self, x: Tensor) -> Tensor:
        # (batch, d_in) -> (batch, d_sae) in O(batch * d_sae * d)
        w = self.normalized_values()
        x = x.to(w.dtype).contiguous()
        pre = masked_encode(x, w, self.b_enc, self.layout)
        # Weak references: enough to recompute selected entries during this step, without
        # keeping the batch alive after it.
        self._last = (weakref.ref(pre), weakref.ref(x))
        return pre

    def gather_pre_activations(self, pre_acts: Tensor, indices: Tensor) -> Tensor | None:
        """``pre_acts.gather(1, indices)`` recomputed from the input, with an ``O(k d)`` gradient.

        Differentiating through a gather of the dense pre-activations would send a
        ``(batch, d_sae)`` gradient through the encoder; recomputing the ``k`` selected entries
        from the input keeps the backward at ``O(batch * k * d)``.

        Args:
            pre_acts: ``(batch, d_sae)``, which must be this encoder's latest output.
            indices: ``(batch, k)`` latent ids.

        Returns:
            ``(batch, k)`` values, or None when ``pre_acts`` is not the latest output (the
            caller then gathers from ``pre_acts`` itself).
        """
        pre_ref, x_ref = self._last
        x = x_ref()
        if pre_ref() is not pre_acts or x is None:
            return None
        w = self.normalized_values()
        return selected_pre_activations(x, w, self.b_enc, indices, self.layout)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_last"] = (_dead_ref, _dead_ref)  # weak references cannot be pickled
        return state

    trains_through_affine = False  # affine() builds the dense matrix: export only

    def affine(self) -> tuple[Tensor, Tensor]:
        """The dense ``(W_enc, b_enc)`` (built by :meth:`dense_weight`), for export only."""
        return self.dense_weight(), self.b_enc.detach()

    def fused_sparsify(
        self, x: Tensor, sparsity: SparsityFn, *, step: int, decoder: Decoder
    ) -> SparsityOutput | None:
        """Codes by ``signed_topk``, ``topk`` or ``batchtopk`` without the ``(batch, d_sae)``
        pre-activations (:mod:`sae_expander.sparsify`); None for other sparsity functions."""
        from sae_expander.sparsify import fused_sparsify

        return fused_sparsify(self, x, sparsity, decoder)

    @torch.no_grad()
    def dense_weight(self) -> Tensor:
        """The dense ``(d_sae, d_in)`` matrix, for evaluation and export only."""
        w = self.normalized_values()
        return w.new_zeros(self.d_sae, self.d_in).scatter_(1, self._rows, w)


def _dead_ref() -> None:
    return None


def _rebuild_layout_after_load(module: nn.Module, incompatible: Any) -> None:
    """Derive the kernels' int64 layout from freshly loaded ``indices``, checking them first."""
    assert isinstance(module, ExpanderEncoder)
    rows = module.indices.long()
    bad = (rows < 0) | (rows >= module.d_in)
    if bool(bad.any()):
        raise SaeLightningError(
            f"expander encoder: loaded indices must lie in [0, {module.d_in}), found "
            f"{rows[bad][:5].tolist()}; the file was not written for d_in={module.d_in}"
        )
    sorted_rows = rows.sort(dim=1).values
    if bool((sorted_rows[:, 1:] == sorted_rows[:, :-1]).any()):
        raise SaeLightningError(
            "expander encoder: loaded indices repeat a row within one latent; the file is "
            "corrupt or was not written by sae-expander"
        )
    module._set_layout(rows)
