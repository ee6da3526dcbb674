"""The encoder product fused with a selection, whose backward touches only the selected latents.

For a TopK SAE the only unavoidable dense work is the encoder product ``x @ W_enc.T``
(``2 * batch * d_in * d_sae`` FLOPs). Differentiating through the dense ``(batch, d_sae)``
pre-activations costs two more products of that size (the gradients of ``x`` and ``W_enc``).
Only ``k`` entries per row were selected, so with ``g`` the ``(batch, k)`` gradient of the
selected values and ``idx`` their latent ids, the backward needs ``batch * k * d_in`` work:

- ``grad_W[i] = sum over (b, j) with idx[b, j] == i of g[b, j] x[b]``: the pairs sorted by
  latent, each touched row accumulated once, no ``(batch, k, d_in)`` tensor
  (:func:`~sae_lightning.kernels.weight_grad.sparse_weight_grad`);
- ``grad_b[i]``: an ``index_add_`` of ``batch * k`` scalars;
- the input's gradient only where it is needed: for the centring shift ``b_dec`` it is
  ``-grad_b @ W``, for ``x`` itself an ``embedding_bag`` gather of ``k`` rows.

The forward computes the product in row chunks of at most
:data:`~sae_lightning.kernels.memory.DEFAULT_CHUNK_BYTES` and keeps only the selected
``(batch, k)`` values and ids, so no ``(batch, d_sae)`` tensor outlives it. The same code runs
on CPU and CUDA.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_lightning.kernels.memory import WORKSPACE, default_chunk_rows
from sae_lightning.kernels.select import (
    FlatSelection,
    QuotaFn,
    Selection,
    ThresholdFn,
    batch_topk_select,
    concat,
    dead_topk_select,
    offsets_of,
    threshold_select,
    topk_selection,
)
from sae_lightning.kernels.weight_grad import sparse_weight_grad


class EncoderInputs(NamedTuple):
    """A linear encoder's inputs: it computes ``(x - shift) @ weight.T + bias``.

    The SAE builds this for a sparsity plugin's ``fused_encode``; the plugin may keep it for
    the auxiliary loss of the same step.
    """

    x: Tensor
    """``(batch, d_in)`` the batch as the SAE received it."""
    shift: Tensor | None
    """``(d_in,)`` subtracted from ``x`` first (the decoder bias when the encoder centres
    inputs), or None."""
    weight: Tensor
    """``(d_sae, d_in)`` encoder matrix ``W_enc``."""
    bias: Tensor | None
    """``(d_sae,)`` encoder bias ``b_enc``, or None."""


class DeadSelection(NamedTuple):
    """AuxK's latents, selected in the fused forward pass of the step whose term needs them.

    Each row's largest pre-activations among the dead latents, taken from the same product
    chunks as the codes, so the auxiliary term costs no second encoder product and, its shapes
    fixed by ``k_aux``, no read of the number of dead latents.
    """

    values: Tensor
    """``(batch, width)`` the selected pre-activations; 0 (and no gradient) in the slots past a
    row's dead latents. ``width`` is ``min(k_aux, d_sae)``, or the caller's bound on the number
    of dead latents when smaller (0: none can be dead)."""
    indices: Tensor
    """``(batch, width)`` their latent ids."""
    dead: Tensor
    """``(d_sae,)`` the dead mask they were selected with."""
    inputs: EncoderInputs
    """The step's encoder inputs, for a term asked with another mask."""


class TopKEncoder(torch.autograd.Function):
    """``select((x - shift) @ weight[rows].T + bias[rows])``, backward over selected pairs only.

    ``forward(x, shift, weight, bias, select, rows, chunk_rows) -> (values, indices)``, with the
    tensors of :class:`EncoderInputs`; ``select`` maps a ``(rows, n)`` block of pre-activations
    to a :data:`Selection`, or the whole batch to a :class:`FlatSelection` (then ``values`` and
    ``indices`` are its flat lists); ``rows`` (optional ``(n,)`` latent ids) restricts the
    product to those latents (AuxK's dead ones); ``chunk_rows`` (None: the whole batch) bounds
    the rows multiplied at once, and must be None for a selection across rows (BatchTopK).
    ``indices`` are global latent ids and carry no gradient; padded slots of ``values`` are 0
    and pass no gradient. The gradient of ``shift`` is ``-grad_bias @ weight``, a matrix-vector
    product, so no per-row input gradient is formed unless ``x`` itself requires one.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        shift: Tensor | None,
        weight: Tensor,
        bias: Tensor | None,
        select: Callable[[Tensor], Selection],
        rows: Tensor | None,
        chunk_rows: int | None,
    ) -> tuple[Tensor, Tensor]:
        x_enc = x if shift is None else x - shift  # (batch, d_in)
        w = weight if rows is None else weight.index_select(0, rows)  # (n, d_in)
        b = None if bias is None else (bias if rows is None else bias.index_select(0, rows))
        batch = x.shape[0]
        step = batch if chunk_rows is None else max(1, min(chunk_rows, batch))
        if step >= batch and x.device.type != "cpu":
            parts = [select(_affine(x_enc, w, b))]
        else:
            with WORKSPACE.borrow(step * w.shape[0], x) as buf:
                chunk = buf.view(step, w.shape[0])  # (step, n), reused by every chunk
                parts = [
                    select(_affine(x_enc[i : i + step], w, b, out=chunk[: min(step, batch - i)]))
                    for i in range(0, batch, step)
                ]
        values, indices, valid = concat(parts)[:3]
        if rows is not None:
            indices = rows[indices]
        entry_rows = parts[0].rows if isinstance(parts[0], FlatSelection) else None
        ctx.save_for_backward(x_enc, weight, indices, valid, entry_rows)
        ctx.has_shift = shift is not None
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(
        ctx: Any, grad_values: Tensor, grad_indices: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        x_enc, weight, indices, valid, entry_rows = ctx.saved_tensors
        need_x, need_shift, need_w, need_b = ctx.needs_input_grad[:4]
        g = grad_values.to(weight.dtype)
        if valid is not None:
            g = g * valid
        g = g.contiguous()  # (batch, k), or (entries,) with their rows
        grad_x = grad_shift = grad_w = grad_b = None
        if need_x:
            # ids and weights -> (batch, d_in): sum over a row's entries of g W[idx]
            grad_x = _gather_rows(indices, g, weight, entry_rows, x_enc.shape[0])
        if need_w:
            x_w = x_enc.to(weight.dtype)
            grad_w = sparse_weight_grad(indices, g, x_w, weight.shape[0], rows=entry_rows)
        if (ctx.has_bias and need_b) or (ctx.has_shift and need_shift):
            per_latent = weight.new_zeros(weight.shape[0])  # (d_sae,) sum of g per latent
            per_latent.index_add_(0, indices.reshape(-1), g.reshape(-1))
            if ctx.has_bias and need_b:
                grad_b = per_latent
            if ctx.has_shift and need_shift:
                # sum_b grad_x[b] = per_latent @ W; the shift enters with a minus sign.
                grad_shift = -(per_latent @ weight)
        return grad_x, grad_shift, grad_w, grad_b, None, None, None


def _gather_rows(
    indices: Tensor, weights: Tensor, table: Tensor, rows: Tensor | None, batch: int
) -> Tensor:
    """``(batch, d)``: each row's sum of ``weights * table[indices]`` over its entries, for
    ``(batch, k)`` entries or a flat list with the ``rows`` of its entries (any order)."""
    if rows is None:
        return F.embedding_bag(indices, table, per_sample_weights=weights, mode="sum")
    rows, order = rows.sort(stable=True)
    return F.embedding_bag(
        indices[order],
        table,
        offsets_of(rows, batch),
        per_sample_weights=weights[order],
        mode="sum",
    )


def _affine(x: Tensor, w: Tensor, b: Tensor | None, out: Tensor | None = None) -> Tensor:
    """``x @ w.T + b`` into ``out`` when given: ``(rows, d_in) -> (rows, n)``."""
    if b is None:
        return torch.mm(x, w.t(), out=out)
    return torch.addmm(b, x, w.t(), out=out)


def topk_encode(
    inputs: EncoderInputs,
    k: int,
    *,
    rows: Tensor | None = None,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-row top-k of the encoder's pre-activations (of latents ``rows`` only, if given).

    Args:
        inputs: the linear encoder's input, weight and bias.
        k: entries kept per row (at most the number of latents considered).
        rows: optional ``(n,)`` latent ids to consider; returned ids are still global.
        chunk_rows: rows multiplied at once; None picks :func:`default_chunk_rows`.

    Returns:
        ``(values, indices)``, both ``(batch, k)``: the selected pre-activations (not yet
        ReLU'd) and their latent ids.
    """
    x, shift, weight, bias = inputs
    n = weight.shape[0] if rows is None else rows.numel()
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(x.shape[0], n, x.element_size(), x.device)
    return TopKEncoder.apply(x, shift, weight, bias, topk_selection(k), rows, chunk_rows)


def batch_topk_encode(
    inputs: EncoderInputs,
    n_keep: int,
    *,
    threshold_of: ThresholdFn | None = None,
    quota_of: QuotaFn | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """BatchTopK of the encoder's pre-activations (:func:`batch_topk_select`).

    The whole ``(batch, d_sae)`` product exists at once here (the selection spans rows).

    Args:
        inputs: the linear encoder's input, weight and bias.
        n_keep: entries kept over the batch (``k * batch``, times the DDP world).
        threshold_of, quota_of: as for :func:`batch_topk_select`.

    Returns:
        ``(values, indices, offsets)``: the kept entries as a flat row-major list of
        ``min(n_keep, batch * d_sae)`` slots (padding: value 0 at latent 0, at the end) and the
        first slot of each row, ``(batch,)``.
    """

    def select(pre: Tensor) -> FlatSelection:
        return batch_topk_select(pre, n_keep, threshold_of=threshold_of, quota_of=quota_of)

    values, indices, selection = _encode_recorded(inputs, select, None)
    assert isinstance(selection, FlatSelection)
    return values, indices, selection.offsets


def threshold_encode(
    inputs: EncoderInputs, threshold: Tensor | float, *, chunk_rows: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The encoder's pre-activations above ``threshold`` (:func:`threshold_select`), row by row.

    BatchTopK's inference rule. The selection is per row, so the product runs in row chunks
    as for :func:`topk_encode`.

    Returns:
        ``(values, indices, valid)`` as :func:`batch_topk_encode` returns them.
    """
    x, _, weight, _ = inputs
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(x.shape[0], weight.shape[0], x.element_size(), x.device)

    def select(pre: Tensor) -> Selection:
        return threshold_select(pre, threshold)

    values, indices, selection = _encode_recorded(inputs, select, chunk_rows)
    assert selection[2] is not None
    return values, indices, selection[2]


def topk_encode_with_dead(
    inputs: EncoderInputs,
    k: int,
    dead: Tensor,
    width: int,
    *,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor, DeadSelection]:
    """:func:`topk_encode` and AuxK's :class:`DeadSelection` from the same product chunks.

    Args:
        inputs, k, chunk_rows: as for :func:`topk_encode`.
        dead: ``(d_sae,)`` bool mask of dead latents.
        width: dead latents kept per row (``min(k_aux, d_sae)``; 0 selects none).

    Returns:
        ``(values, indices, selection)``: the top-k as :func:`topk_encode` returns it, and the
        dead latents' top ``width`` per row; one backward serves both.
    """
    if width == 0:
        return (*topk_encode(inputs, k, chunk_rows=chunk_rows), _no_dead(inputs, dead))
    x, _, weight, _ = inputs
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(x.shape[0], weight.shape[0], x.element_size(), x.device)
    select = with_dead_topk(topk_selection(k), width, dead)
    values, indices = TopKEncoder.apply(*inputs, select, None, chunk_rows)
    values, indices, aux_values, aux_indices = _split(values, indices, width)
    return values, indices, DeadSelection(aux_values, aux_indices, dead, inputs)


def batch_topk_encode_with_dead(
    inputs: EncoderInputs,
    n_keep: int,
    dead: Tensor,
    width: int,
    *,
    threshold_of: ThresholdFn | None = None,
    quota_of: QuotaFn | None = None,
) -> tuple[Tensor, Tensor, Tensor, DeadSelection]:
    """:func:`batch_topk_encode` and AuxK's :class:`DeadSelection` from the same product.

    Args:
        inputs, n_keep, threshold_of, quota_of: as for :func:`batch_topk_encode`.
        dead, width: as for :func:`topk_encode_with_dead`.
    """

    def select(pre: Tensor) -> FlatSelection:
        return batch_topk_select(pre, n_keep, threshold_of=threshold_of, quota_of=quota_of)

    if width == 0:
        return (
            *batch_topk_encode(inputs, n_keep, threshold_of=threshold_of, quota_of=quota_of),
            _no_dead(inputs, dead),
        )
    values, indices, selection = _encode_recorded(inputs, with_dead_topk(select, width, dead), None)
    assert isinstance(selection, FlatSelection)
    cut = inputs.x.shape[0] * width  # the dead selection's entries come first
    aux_values, aux_indices = values[:cut].view(-1, width), indices[:cut].view(-1, width)
    selection_out = DeadSelection(aux_values, aux_indices, dead, inputs)
    return values[cut:], indices[cut:], selection.offsets, selection_out


def dead_topk_encode(
    inputs: EncoderInputs, dead: Tensor, width: int, *, chunk_rows: int | None = None
) -> tuple[Tensor, Tensor]:
    """The top ``width`` pre-activations of each row among the ``dead`` latents, by a product of
    every latent (fixed shapes, so nothing is read on the host): AuxK's term when the forward
    pass did not select them (:func:`dead_topk_select` gives the layout)."""
    x, _, weight, _ = inputs
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(x.shape[0], weight.shape[0], x.element_size(), x.device)
    live = ~dead

    def select(pre: Tensor) -> Selection:
        return dead_topk_select(pre, width, live)

    return TopKEncoder.apply(*inputs, select, None, chunk_rows)


def with_dead_topk(
    select: Callable[[Tensor], Any], width: int, dead: Tensor
) -> Callable[[Tensor], Any]:
    """``select``, then :func:`dead_topk_select` of the same chunk, its ``width`` columns first
    (a chunk padded by :func:`concat` grows at the end, past them). For a
    :class:`FlatSelection`, the dead selection's ``(rows, width)`` entries come first in the
    flat lists (``offsets`` stay those of the selection's own entries, after them)."""
    live = ~dead

    def both(pre: Tensor) -> Selection | FlatSelection:
        chosen = select(pre)  # before the dead selection overwrites ``pre``
        aux_values, aux_indices, aux_valid = dead_topk_select(pre, width, live)
        if isinstance(chosen, FlatSelection):
            row_ids = torch.arange(pre.shape[0], device=pre.device)
            return FlatSelection(
                torch.cat([aux_values.reshape(-1), chosen.values]),
                torch.cat([aux_indices.reshape(-1), chosen.indices]),
                torch.cat([aux_valid.reshape(-1), chosen.valid]),
                torch.cat([row_ids.repeat_interleave(width), chosen.rows]),
                chosen.offsets,
            )
        values, indices, valid = chosen
        if valid is None:
            valid = torch.ones_like(values, dtype=torch.bool)
        return (
            torch.cat([aux_values, values], dim=1),
            torch.cat([aux_indices, indices], dim=1),
            torch.cat([aux_valid, valid], dim=1),
        )

    return both


def _split(values: Tensor, indices: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The codes' columns and the dead selection's (the first ``width``), each contiguous, as
    the decoders' ``embedding_bag`` needs them."""
    return (
        values[:, width:].contiguous(),
        indices[:, width:].contiguous(),
        values[:, :width].contiguous(),
        indices[:, :width].contiguous(),
    )


def _no_dead(inputs: EncoderInputs, dead: Tensor) -> DeadSelection:
    """A :class:`DeadSelection` of width 0 (no latent can be dead)."""
    x = inputs.x
    empty = torch.zeros(x.shape[0], 0, dtype=torch.long, device=x.device)
    return DeadSelection(x.new_zeros(x.shape[0], 0), empty, dead, inputs)


def _encode_recorded(
    inputs: EncoderInputs, select: Callable[[Tensor], Any], chunk_rows: int | None
) -> tuple[Tensor, Tensor, Selection | FlatSelection]:
    """:class:`TopKEncoder` with ``select``; also returns the selection it made (the chunks'
    :data:`Selection` joined, or the whole batch's :class:`FlatSelection`)."""
    parts: list[Any] = []

    def recording(pre: Tensor) -> Any:
        parts.append(select(pre))
        return parts[-1]

    values, indices = TopKEncoder.apply(*inputs, recording, None, chunk_rows)
    return values, indices, parts[0] if isinstance(parts[0], FlatSelection) else concat(parts)
