"""Encode and select in one pass, so the ``(batch, d_sae)`` pre-activations never exist at once.

The batch is encoded in blocks of rows small enough for the cache (:func:`block_rows`), grouped
up to a fixed workspace (:func:`group_rows`); each group's pre-activations are reduced to its
selection before the next group is computed, so beyond the parameters the forward keeps
``O(batch * k)`` values whatever the batch size. Every row is complete within its block, so a
row's top-k is exact without merging partial results. The rules are those of the dense plugins:

- ``signed_topk`` and ``topk``: the per-row top-k by the core's ``topk_select``, the same
  deterministic function of a row the dense path applies, so both paths pick the same latents,
  ties included (``topk`` then applies ReLU);
- ``batchtopk``: two passes. The first keeps a running top ``k * batch`` of the batch's values
  (the threshold, found by the plugin's own ``batch_threshold``, a collective under DDP); the
  second recomputes each block and keeps its entries at or above the threshold, padded to the
  widest row (as the core pads a threshold's selection); the plugin then zeroes the ties past
  the rule's quota (ties go by position). At inference a measured threshold needs one pass.

The encoder's bias rides in the gather as a ``(d + 1)``-th value per latent on a constant-one
input row, which saves a pass over every block (bit for bit the same sum: the bias is the last
term added). The backward touches only the selected entries: ``O(batch * k * d)``
(:class:`_Selected`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import accumulate
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_expander.kernels import MaskLayout, selected_backward
from sae_lightning.kernels.select import _BLOCK, Selection, concat, threshold_select

WORKSPACE_BYTES = 16 * 2**20
"""Most pre-activations held at once (a group of blocks). A block's rows are also capped so that
its transposed input (``d_in x rows``) stays in L2 cache, which the encoder's gather needs."""

_TABLE_ELEMENTS = 1 << 16

Select = Callable[[list[Tensor]], Selection]
"""Maps a group of consecutive latent-major ``(d_sae, rows)`` blocks to the selection of their
rows, in order."""

_VECTOR = 16
"""Block rows are rounded down to a multiple of this: ``embedding_bag``'s CPU kernel adds each
table row (``rows`` floats) in 16-float vectors, and a ragged tail measured 20-30% slower."""


class ExpanderInputs(NamedTuple):
    """The expander encoder's inputs: it computes ``(x - shift) @ Aᵀ + bias``.

    ``A`` is the ``(d_sae, d_in)`` masked matrix with ``A[j, layout.rows[j, s]] = w[j, s]``.
    The fused path's ``aux_source``: AuxK encodes the dead latents from it.
    """

    x: Tensor
    """``(batch, d_in)`` the batch as the SAE received it."""
    shift: Tensor | None
    """``(d_in,)`` subtracted from ``x`` first (``b_dec`` when centring), or None."""
    w: Tensor
    """``(d_sae, d)`` values of the unit-norm atoms."""
    bias: Tensor
    """``(d_sae,)`` encoder bias ``b_enc``."""
    layout: MaskLayout
    """The mask."""

    def latents(self, ids: Tensor) -> ExpanderInputs:
        """The same inputs restricted to the latents ``ids`` ``(n,)`` (AuxK's dead ones)."""
        return self._replace(w=self.w[ids], bias=self.bias[ids], layout=self.layout.latents(ids))


def group_rows(d_sae: int, element_size: int) -> int:
    """Rows selected together: as many as :data:`WORKSPACE_BYTES` of pre-activations hold."""
    return max(1, WORKSPACE_BYTES // max(1, d_sae * element_size))


def block_rows(d_in: int, d_sae: int, element_size: int) -> int:
    """Rows per block: the group bound and the cache bound on the gather table."""
    by_cache = _TABLE_ELEMENTS // max(1, d_in)
    rows = max(1, min(group_rows(d_sae, element_size), max(8, by_cache)))
    return rows - rows % _VECTOR if rows >= _VECTOR else rows


def pre_activation_blocks(x: Tensor, weights: Tensor, layout: MaskLayout) -> Iterator[list[Tensor]]:
    """Groups of consecutive ``(d_sae, rows)`` blocks of ``(x @ Aᵀ + bias)ᵀ``, no autograd.

    ``weights`` is ``(d_sae, d + 1)``: the atoms' values, then the bias, which multiplies a
    constant-one row appended to the table (``layout.bags`` points there). Blocks come
    latent-major, as ``F.embedding_bag`` writes them (a bag per latent): the selections below
    work in that layout, which saves transposing every block. A block's rows are few, so that
    its table stays in cache (:func:`block_rows`); a group holds up to :func:`group_rows` rows,
    enough that a selection's per-row ``torch.topk`` and ``gather`` calls split over threads
    (they parallelise over chunks of 32768 elements: 128 rows of 256 candidates).
    """
    batch, d_in = x.shape
    per_group = group_rows(layout.d_sae, x.element_size())
    step = block_rows(layout.d_in, layout.d_sae, x.element_size())
    if x.device.type != "cpu":  # the caching allocator recycles; cache locality is a CPU concern
        step = per_group
    table = x.new_ones(d_in + 1, min(step, batch))  # (d_in + 1, rows), last row: the bias input
    group: list[Tensor] = []
    held = 0
    with torch.no_grad():
        for s in range(0, batch, step):
            rows = min(step, batch - s)
            if rows < table.shape[1]:  # the ragged last block
                table = x.new_ones(d_in + 1, rows)
            table[:d_in].copy_(x[s : s + rows].t())
            # bag j sums table[bags[j, :]] weighted by weights[j, :] -> (d_sae, rows)
            block = F.embedding_bag(layout.bags, table, per_sample_weights=weights, mode="sum")
            group.append(block)
            held += rows
            if held + step > per_group:  # the next block would not fit
                yield group
                group, held = [], 0
    if group:
        yield group


def with_bias(w: Tensor, bias: Tensor) -> Tensor:
    """``(d_sae, d + 1)``: the values and the bias as :func:`pre_activation_blocks` reads them."""
    return torch.cat([w, bias.unsqueeze(1)], dim=1)


def _levels(block: Tensor, k: int) -> list[Tensor]:
    """``topk_select``'s levels of block maxima, latent-major: ``(d_sae / 8**i, rows)``.

    Level ``i + 1`` is an elementwise max of ``8`` contiguous slabs of level ``i``.
    """
    levels = [block]
    while (w := levels[-1].shape[0]) % _BLOCK == 0 and w // _BLOCK >= 4 * k:
        levels.append(levels[-1].view(_BLOCK, w // _BLOCK, block.shape[1]).amax(dim=0))
    return levels


def topk_columns(blocks: list[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """``topk_select(torch.cat(blocks, 1).t(), k)`` without transposing the ``(n, rows)`` blocks.

    The same narrowing through block maxima as the core's ``topk_select`` (same levels, same
    candidates in the same order, the same ``torch.topk`` calls on the same values), so the
    latents picked, ties included, are exactly those the dense path picks; only the storage
    order differs. Each ``torch.topk`` runs once over the rows of all ``blocks``.

    Returns:
        ``(values, indices)``, both ``(rows, k)``, unsorted.
    """
    levels = [_levels(block, k) for block in blocks]
    if len(levels[0]) == 1:  # too narrow to narrow down
        return torch.cat([b.t() for b in blocks]).topk(k, dim=1, sorted=False)
    ids = torch.cat([lv[-1].t() for lv in levels]).topk(k, dim=1, sorted=False).indices
    spans = list(accumulate(b.shape[1] for b in blocks))  # each block's end row
    rows = spans[-1]
    for level in range(len(levels[0]) - 2, -1, -1):
        fine_width, coarse_width = levels[0][level].shape[0], levels[0][level + 1].shape[0]
        offsets = torch.arange(0, fine_width, coarse_width, device=ids.device)
        cand = (ids.unsqueeze(2) + offsets).view(rows, k * _BLOCK)  # ids at this level
        # gathers on the transposed views, no copy: measured 2x faster than flat indexing
        parts = zip(levels, cand.tensor_split(spans[:-1]), strict=True)
        values = torch.cat([lv[level].t().gather(1, c) for lv, c in parts])  # (rows, k * 8)
        if level > 0:
            ids = cand.gather(1, values.topk(k, dim=1, sorted=False).indices)
    top, j = values.topk(k, dim=1, sorted=False)
    return top, cand.gather(1, j)


class _Selected(torch.autograd.Function):
    """Selected entries of ``(x - shift) @ Aᵀ + bias``, block by block; backward ``O(k d)``.

    ``forward(x, shift, weights, layout, select) -> (values, indices)``, ``weights`` the
    ``(d_sae, d + 1)`` values and bias of :func:`with_bias`; ``select`` maps each group of
    latent-major blocks to the :data:`Selection` of their rows. Padded slots (``valid`` False)
    hold 0 and pass no gradient. The shift's gradient is ``-(per-latent gradient sums) @ A``,
    one vector product, so no per-row input gradient is formed unless ``x`` itself requires one.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        shift: Tensor | None,
        weights: Tensor,
        layout: MaskLayout,
        select: Select,
    ) -> tuple[Tensor, Tensor]:
        x_enc = (x if shift is None else x - shift).to(weights.dtype).contiguous()  # (batch, d_in)
        parts = [select(group) for group in pre_activation_blocks(x_enc, weights, layout)]
        values, indices, valid = concat(parts)
        ctx.save_for_backward(x_enc, weights, indices, valid)
        ctx.layout = layout
        ctx.dtypes = (x.dtype, None if shift is None else shift.dtype)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx: Any, grad: Tensor, grad_indices: Tensor | None) -> tuple[Tensor | None, ...]:
        x_enc, weights, indices, valid = ctx.saved_tensors
        x_dtype, shift_dtype = ctx.dtypes
        layout: MaskLayout = ctx.layout
        need_x, need_shift, need_weights = ctx.needs_input_grad[:3]
        if valid is not None:
            grad = grad * valid
        w = weights[:, :-1]  # (d_sae, d)
        needs = (need_x, need_weights, need_weights or need_shift)
        gx, gw, gb = selected_backward(needs, x_enc, w, indices, grad, layout)
        if gx is not None:
            gx = gx.to(x_dtype)
        gshift = None
        if need_shift:
            assert gb is not None
            # -(per-latent sums @ A): each latent's d values scattered to their input rows
            spread = (gb.unsqueeze(1) * w).reshape(-1)
            gshift = w.new_zeros(layout.d_in).index_add_(0, layout.rows.reshape(-1), spread)
            gshift = gshift.neg_().to(shift_dtype)
        gweights = None
        if need_weights:
            assert gw is not None and gb is not None
            gweights = with_bias(gw, gb)
        return gx, gshift, gweights, None, None


def select_topk(k: int) -> Select:
    """Per-row top-k, as the dense ``topk`` and ``signed_topk`` select."""

    def select(blocks: list[Tensor]) -> Selection:
        values, indices = topk_columns(blocks, k)
        return values, indices, None

    return select


def select_above(threshold: Tensor | float, *, inclusive: bool) -> Select:
    """Entries above (or at) ``threshold`` and above zero, padded per block."""

    def select(blocks: list[Tensor]) -> Selection:
        return concat(
            [threshold_select(b.t(), threshold, inclusive=inclusive, positive=True) for b in blocks]
        )

    return select


def encode_select(inputs: ExpanderInputs, select: Select) -> tuple[Tensor, Tensor]:
    """``(values, indices)`` of ``select`` applied block by block to the encoder's output.

    Values carry gradients to ``x``, ``shift``, ``w`` and ``bias`` through the selected entries
    only.
    """
    x, shift, w, bias, layout = inputs
    return _Selected.apply(x, shift, with_bias(w, bias), layout, select)


def topk_among(inputs: ExpanderInputs, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each row's top ``min(k, n)`` pre-activations among the latents ``ids`` ``(n,)``.

    Returns:
        ``(values, indices)``, indices global; the cost is ``n / d_sae`` of the encoder's.
    """
    values, local = encode_select(inputs.latents(ids), select_topk(min(k, ids.numel())))
    return values, ids[local]


@torch.no_grad()
def batch_top_values(inputs: ExpanderInputs, n: int) -> Tensor:
    """The ``n`` largest entries of the encoder's output over the batch (any order).

    A running top-``n``: each block contributes only its entries at or above the smallest value
    kept so far, so memory stays ``O(n + group)``. The multiset of values is exact (ties
    included), which is all a threshold needs.
    """
    x, shift, w, bias, layout = inputs
    x = (x if shift is None else x - shift).to(w.dtype).contiguous()
    top = x.new_empty(0)
    blocks = (b for group in pre_activation_blocks(x, with_bias(w, bias), layout) for b in group)
    for block in blocks:
        flat = block.reshape(-1)
        if top.numel() >= n:
            flat = flat[flat >= top.min()]
        merged = torch.cat([top, flat])
        top = merged.topk(n, sorted=False).values if merged.numel() > n else merged
    return top
