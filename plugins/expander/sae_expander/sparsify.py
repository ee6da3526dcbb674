"""The expander encoder's fused path: codes by ``signed_topk``, ``topk`` or ``batchtopk`` without
the dense ``(batch, d_sae)`` pre-activations (see :mod:`sae_expander.fused`).

Each rule is the one its plugin applies to dense pre-activations, so the fused codes equal the
dense path's (tested in float64 and float32). The core ``topk`` and ``batchtopk`` keep their
AuxK term on the dense path: it reads dead latents' pre-activations through the core's linear
fused interface, which a masked encoder has no dense weight for. So while training with AuxK
(``aux_coefficient > 0``) they take the dense path, and the fused one otherwise (inference,
validation, or AuxK off). ``signed_topk`` is fused in every case: the output's ``aux_source`` is
the encoder's :class:`~sae_expander.fused.ExpanderInputs`, from which its AuxK term encodes the
dead latents alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sae_expander.fused import (
    ExpanderInputs,
    batch_top_values,
    encode_select,
    select_above,
    select_topk,
)
from sae_expander.signed_topk import SignedTopK
from sae_lightning.components.base import (
    Codes,
    Decoder,
    SparsityFn,
    SparsityOutput,
    data_parallel_world_size,
)
from sae_lightning.components.sparsity.batchtopk import (
    BatchTopK,
    at_least_fp32,
    batch_quota,
    batch_threshold,
)
from sae_lightning.components.sparsity.topk import TopK
from sae_lightning.kernels.select import kept_by_position

if TYPE_CHECKING:
    from sae_expander.encoder import ExpanderEncoder


def fused_sparsify(
    encoder: ExpanderEncoder, x: Tensor, sparsity: SparsityFn, decoder: Decoder
) -> SparsityOutput | None:
    """Codes of ``x`` (``(batch, d_in)``, not centred) by ``sparsity``; None where not fused."""
    rule = type(sparsity)
    if rule not in (SignedTopK, TopK, BatchTopK):
        return None
    if rule is not SignedTopK and torch.is_grad_enabled() and sparsity.config.aux_coefficient > 0:
        return None  # the core AuxK term needs the dense pre-activations (module docstring)
    shift = decoder.b_dec if encoder.center_input else None
    inputs = ExpanderInputs(x, shift, encoder.normalized_values(), encoder.b_enc, encoder.layout)
    d_sae = encoder.d_sae
    if isinstance(sparsity, SignedTopK):
        values, indices = encode_select(inputs, select_topk(sparsity.config.k))
        # the inputs are AuxK's source: it encodes the dead latents from them
        return SparsityOutput(Codes(values, indices, d_sae), {}, inputs)  # type: ignore[arg-type]
    if isinstance(sparsity, TopK):
        values, indices = encode_select(inputs, select_topk(sparsity.config.k))
        return SparsityOutput(Codes(torch.relu(values), indices, d_sae), {})
    assert isinstance(sparsity, BatchTopK)
    if not sparsity.training and bool(sparsity.threshold >= 0):
        values, indices = encode_select(inputs, select_above(sparsity.threshold, inclusive=False))
    else:
        values, indices = _batch_topk(inputs, sparsity)
    return SparsityOutput(Codes(torch.relu(values), indices, d_sae), {})


def _batch_topk(inputs: ExpanderInputs, sparsity: BatchTopK) -> tuple[Tensor, Tensor]:
    """BatchTopK's batch rule (``BatchTopK.forward``): a first pass over the batch finds the
    threshold (and, in training, updates the running one); the second keeps every entry at or
    above it, then zeroes the ties past the rule's quota (ties go by position)."""
    k, batch = sparsity.config.k, inputs.x.shape[0]
    world = data_parallel_world_size() if sparsity.training else 1
    n_keep = k * batch * world
    top = batch_top_values(inputs, min(n_keep, batch * inputs.layout.d_sae))
    threshold, smallest = batch_threshold(at_least_fp32(torch.relu(top)), n_keep, world)
    if sparsity.training:
        sparsity._update_threshold(smallest)  # the running inference threshold, as forward()
    values, indices = encode_select(inputs, select_above(threshold, inclusive=True))
    kept = kept_by_position(values.detach(), indices, threshold, batch_quota(n_keep, world))
    return values * kept, indices
