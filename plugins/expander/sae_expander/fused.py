"""Encode and select in one pass, so the ``(batch, d_sae)`` pre-activations never exist at once.

The batch is encoded in blocks of rows sized to a fixed workspace (:func:`block_rows`); each
block's pre-activations are reduced to that block's selection before the next block is computed,
so beyond the parameters the forward keeps ``O(batch * k)`` values whatever the batch size.
Every row is complete within its block, so a row's top-k is exact without merging partial
results. The rules are those of the dense plugins:

- ``signed_topk`` and ``topk``: the per-row top-k by the core's ``topk_select``, the same
  deterministic function of a row the dense path applies, so both paths pick the same latents,
  ties included (``topk`` then applies ReLU);
- ``batchtopk``: two passes. The first keeps a running top ``k * batch`` of the batch's values
  (the threshold, found by the plugin's own ``batch_threshold``, a collective under DDP); the
  second recomputes each block and keeps its entries at or above the threshold, padded to the
  widest row as the core pads them. At inference a measured threshold needs one pass.

The backward touches only the selected entries: ``O(batch * k * d)`` (:class:`_Selected`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_expander.kernels import MaskLayout, selected_backward
from sae_lightning.kernels.topk_encoder import _BLOCK, threshold_select

WORKSPACE_BYTES = 8 * 2**20
"""Largest block of pre-activations held at once. Rows are also capped so that the transposed
input block (``d_in x rows``) stays in L2 cache, which the encoder's gather needs to be fast."""

_TABLE_ELEMENTS = 1 << 16

Selection = tuple[Tensor, Tensor, Tensor | None]
"""``(values, indices, valid)`` of one block, as the core's selections: ``valid`` marks real
entries of rows padded to a common width, None when every entry is real."""


def block_rows(d_in: int, d_sae: int, element_size: int) -> int:
    """Rows per block: the workspace bound and the cache bound on the gather table."""
    by_workspace = WORKSPACE_BYTES // max(1, d_sae * element_size)
    by_cache = _TABLE_ELEMENTS // max(1, d_in)
    return max(1, min(by_workspace, max(8, by_cache)))


def pre_activation_blocks(
    x: Tensor, w: Tensor, bias: Tensor, layout: MaskLayout
) -> Iterator[tuple[int, Tensor]]:
    """``(first row, (d_sae, rows) block of (x @ Aᵀ + bias)ᵀ)``, no autograd.

    Blocks come latent-major, as ``F.embedding_bag`` writes them (a bag per latent): the
    selections below work in that layout, which saves transposing every block.
    """
    batch = x.shape[0]
    step = block_rows(layout.d_in, layout.d_sae, x.element_size())
    if x.device.type != "cpu":  # the caching allocator recycles; cache locality is a CPU concern
        step = max(step, WORKSPACE_BYTES // max(1, layout.d_sae * x.element_size()))
    with torch.no_grad():
        for s in range(0, batch, step):
            table = x[s : s + step].t().contiguous()  # (d_in, rows)
            # bag j sums table[rows[j, :]] weighted by w[j, :] -> (d_sae, rows)
            block = F.embedding_bag(layout.rows, table, per_sample_weights=w, mode="sum")
            yield s, block.add_(bias.unsqueeze(1))


def topk_columns(block: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``topk_select(block.t(), k)`` without transposing ``block`` ``(n, rows)``, bit for bit.

    The same narrowing through block maxima as the core's ``topk_select`` (same levels, same
    candidates in the same order, the same ``torch.topk`` calls on the same values), so the
    latents picked, ties included, are exactly those the dense path picks; only the storage
    order differs: level ``i + 1`` is an elementwise max of ``8`` contiguous slabs of level ``i``.

    Returns:
        ``(values, indices)``, both ``(rows, k)``, unsorted.
    """
    rows = block.shape[1]
    levels = [block]  # levels[i] is (d_sae / 8**i, rows)
    while (w := levels[-1].shape[0]) % _BLOCK == 0 and w // _BLOCK >= 4 * k:
        levels.append(levels[-1].view(_BLOCK, w // _BLOCK, rows).amax(dim=0))
    if len(levels) == 1:  # too narrow to narrow down
        return block.t().contiguous().topk(k, dim=1, sorted=False)
    ids = levels[-1].t().contiguous().topk(k, dim=1, sorted=False).indices  # (rows, k)
    col = torch.arange(rows, device=block.device).unsqueeze(1)
    for level in range(len(levels) - 2, -1, -1):
        fine, coarse_width = levels[level], levels[level + 1].shape[0]
        offsets = torch.arange(0, fine.shape[0], coarse_width, device=block.device)
        cand = (ids.unsqueeze(2) + offsets).view(rows, k * _BLOCK)  # ids at this level
        values = fine.view(-1)[cand * rows + col]  # (rows, k * 8)
        if level > 0:
            ids = cand.gather(1, values.topk(k, dim=1, sorted=False).indices)
    top, j = values.topk(k, dim=1, sorted=False)
    return top, cand.gather(1, j)


class _Selected(torch.autograd.Function):
    """Selected entries of ``(x - shift) @ Aᵀ + bias``, block by block; backward ``O(k d)``.

    ``forward(x, shift, w, bias, layout, select) -> (values, indices)``: ``select`` maps each
    latent-major block to a :data:`Selection`. Padded slots (``valid`` False) hold 0 and pass no
    gradient. The shift's gradient is ``-(per-latent gradient sums) @ A``, one vector product,
    so no per-row input gradient is formed unless ``x`` itself requires one.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        shift: Tensor | None,
        w: Tensor,
        bias: Tensor,
        layout: MaskLayout,
        select: Callable[[Tensor], Selection],
    ) -> tuple[Tensor, Tensor]:
        x_enc = (x if shift is None else x - shift).to(w.dtype).contiguous()  # (batch, d_in)
        parts = [select(block) for _, block in pre_activation_blocks(x_enc, w, bias, layout)]
        values, indices, valid = concat(parts)
        ctx.save_for_backward(x_enc, w, indices, valid)
        ctx.layout = layout
        ctx.dtypes = (x.dtype, None if shift is None else shift.dtype)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx: Any, grad: Tensor, grad_indices: Tensor | None) -> tuple[Tensor | None, ...]:
        x_enc, w, indices, valid = ctx.saved_tensors
        x_dtype, shift_dtype = ctx.dtypes
        layout: MaskLayout = ctx.layout
        need_x, need_shift, need_w, need_b = ctx.needs_input_grad[:4]
        if valid is not None:
            grad = grad * valid
        needs = (need_x, need_w, need_b or need_shift)
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
        gb = gb if need_b else None
        return gx, gshift, gw, gb, None, None


def concat(parts: list[Selection]) -> Selection:
    """The selections of consecutive blocks as one, padded to the widest (value 0, latent 0)."""
    width = max(p[0].shape[1] for p in parts)
    if parts[0][2] is None:
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), None

    def pad(t: Tensor) -> Tensor:
        return F.pad(t, (0, width - t.shape[1]))

    return tuple(torch.cat([pad(p[i]) for p in parts]) for i in range(3))  # type: ignore[return-value]


def select_topk(k: int) -> Callable[[Tensor], Selection]:
    """Per-row top-k of a block, as the dense ``topk`` and ``signed_topk`` select."""

    def select(block: Tensor) -> Selection:
        values, indices = topk_columns(block, k)
        return values, indices, None

    return select


def select_above(threshold: Tensor | float, *, inclusive: bool) -> Callable[[Tensor], Selection]:
    """Entries above (or at) ``threshold`` and above zero, padded per block."""

    def select(block: Tensor) -> Selection:
        return threshold_select(block.t(), threshold, inclusive=inclusive, positive=True)

    return select


def encode_select(
    x: Tensor,
    shift: Tensor | None,
    w: Tensor,
    bias: Tensor,
    layout: MaskLayout,
    select: Callable[[Tensor], Selection],
) -> tuple[Tensor, Tensor]:
    """``(values, indices)`` of ``select`` applied block by block to ``(x - shift) @ Aᵀ + bias``.

    Values carry gradients to ``x``, ``shift``, ``w`` and ``bias`` through the selected entries
    only.
    """
    return _Selected.apply(x, shift, w, bias, layout, select)


@torch.no_grad()
def batch_top_values(
    x: Tensor, shift: Tensor | None, w: Tensor, bias: Tensor, layout: MaskLayout, n: int
) -> Tensor:
    """The ``n`` largest entries of ``(x - shift) @ Aᵀ + bias`` over the batch (any order).

    A running top-``n``: each block contributes only its entries at or above the smallest value
    kept so far, so memory stays ``O(n + block)``. The multiset of values is exact (ties
    included), which is all a threshold needs.
    """
    x = (x if shift is None else x - shift).to(w.dtype).contiguous()
    top = x.new_empty(0)
    for _, block in pre_activation_blocks(x, w, bias, layout):
        flat = block.reshape(-1)
        if top.numel() >= n:
            flat = flat[flat >= top.min()]
        merged = torch.cat([top, flat])
        top = merged.topk(n, sorted=False).values if merged.numel() > n else merged
    return top
