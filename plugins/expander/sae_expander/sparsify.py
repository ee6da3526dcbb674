"""The expander encoder's fused path: codes by ``signed_topk``, ``topk`` or ``batchtopk`` without
the dense ``(batch, d_sae)`` pre-activations (see :mod:`sae_expander.fused`).

Each rule is the one its plugin applies to dense pre-activations, so the fused codes equal the
dense path's (tested in float64 and float32). The core ``topk`` and ``batchtopk`` keep their
AuxK term on the dense path: it reads dead latents' pre-activations through the core's linear
fused interface, which a masked encoder has no dense weight for. So while training with AuxK
(``aux_coefficient > 0``) they take the dense path, and the fused one otherwise (inference,
validation, or AuxK off). ``signed_topk`` is fused in every case: its AuxK term reads the dead
latents through :class:`AuxSource`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sae_expander.fused import (
    Selection,
    batch_top_values,
    encode_select,
    select_above,
    select_topk,
)
from sae_expander.kernels import MaskLayout
from sae_expander.signed_topk import SignedTopK
from sae_lightning.components.base import (
    Codes,
    Decoder,
    SparsityFn,
    SparsityOutput,
    data_parallel_world_size,
)
from sae_lightning.components.sparsity.batchtopk import BatchTopK, at_least_fp32, batch_threshold
from sae_lightning.components.sparsity.topk import TopK

if TYPE_CHECKING:
    from sae_expander.encoder import ExpanderEncoder


class AuxSource:
    """The dead latents' top pre-activations of one batch, on demand, for AuxK.

    Holds the encoder's input of the forward pass; calling it encodes the dead latents only
    (``n_dead / d_sae`` of the encoder's work) and keeps each row's largest ``k_aux``.
    """

    def __init__(
        self, x: Tensor, shift: Tensor | None, w: Tensor, bias: Tensor, layout: MaskLayout
    ) -> None:
        self.x, self.shift, self.w, self.bias, self.layout = x, shift, w, bias, layout

    def __call__(self, dead: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
        """``(values, indices)``, both ``(batch, min(k_aux, n_dead))``, indices global.

        Values carry gradients through the selected entries only, ``O(batch * k_aux * d)``.
        """
        ids = dead.nonzero().squeeze(1)  # (n_dead,)
        empty = ids.new_zeros(0)
        sub = MaskLayout(self.layout.rows[ids], empty, empty, empty, self.layout.d_in)
        k = min(k_aux, ids.numel())
        values, local = encode_select(
            self.x, self.shift, self.w[ids], self.bias[ids], sub, select_topk(k)
        )
        return values, ids[local]


def fused_sparsify(
    encoder: ExpanderEncoder, x: Tensor, sparsity: SparsityFn, decoder: Decoder
) -> SparsityOutput | None:
    """Codes of ``x`` (``(batch, d_in)``, not centred) by ``sparsity``; None where not fused."""
    rule = type(sparsity)
    if rule not in (SignedTopK, TopK, BatchTopK):
        return None
    if rule is not SignedTopK and torch.is_grad_enabled() and sparsity.config.aux_coefficient > 0:
        return None  # the core AuxK term needs the dense pre-activations (module docstring)
    w = encoder.normalized_values()
    shift = decoder.b_dec if encoder.center_input else None
    inputs = (x, shift, w, encoder.b_enc, encoder.layout)
    d_sae = encoder.d_sae
    if isinstance(sparsity, SignedTopK):
        values, indices = encode_select(*inputs, select_topk(sparsity.config.k))
        sparsity.keep_aux_source(AuxSource(*inputs) if torch.is_grad_enabled() else None)
        return SparsityOutput(Codes(values, indices, d_sae), {})
    if isinstance(sparsity, TopK):
        values, indices = encode_select(*inputs, select_topk(sparsity.config.k))
        return SparsityOutput(Codes(torch.relu(values), indices, d_sae), {})
    assert isinstance(sparsity, BatchTopK)
    values, indices = encode_select(*inputs, _batch_topk_rule(inputs, sparsity))
    return SparsityOutput(Codes(torch.relu(values), indices, d_sae), {})


Inputs = tuple[Tensor, Tensor | None, Tensor, Tensor, MaskLayout]
"""``(x, shift, w, bias, layout)``: the encoder computes ``(x - shift) @ Aᵀ + bias``."""


def _batch_topk_rule(inputs: Inputs, sparsity: BatchTopK) -> Callable[[Tensor], Selection]:
    """BatchTopK's selection (``BatchTopK.forward``); training and before a threshold is
    measured, a first pass over the batch finds the threshold (and updates the running one)."""
    if not sparsity.training and bool(sparsity.threshold >= 0):
        return select_above(sparsity.threshold, inclusive=False)
    x, _, _, _, layout = inputs
    k, batch = sparsity.config.k, x.shape[0]
    world = data_parallel_world_size() if sparsity.training else 1
    n_keep = k * batch * world
    top = batch_top_values(*inputs, min(n_keep, batch * layout.d_sae))
    threshold, smallest = batch_threshold(at_least_fp32(torch.relu(top)), n_keep, world)
    if sparsity.training:
        sparsity._update_threshold(smallest)  # the running inference threshold, as forward()
    return select_above(threshold, inclusive=True)
