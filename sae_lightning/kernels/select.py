"""Selections: which pre-activations a sparsity keeps, as ``(values, indices, valid)``.

TopK keeps the ``k`` largest per row (:func:`topk_select`); BatchTopK the ``k x batch`` largest
of the batch (:func:`batch_topk_select`, a :class:`FlatSelection` of fixed length) and, at
inference, every entry above a fixed threshold (:func:`threshold_select`, rows padded to the
widest one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.torch_version import TorchVersion

_BLOCK = 8
"""Entries per block at each level of the hierarchical CPU top-k (``topk_select``)."""

Selection = tuple[Tensor, Tensor, Tensor | None]
"""``(values, indices, valid)``: ``(rows, width)`` selected entries, their column ids, and a
bool mask of real entries when rows were padded to a common width (None when all are real)."""


def topk_select(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact per-row top-k of ``pre`` ``(rows, n)``: ``(values, indices)``, unsorted.

    On CPU it narrows the search through block maxima: level 1 holds the max of each block of
    :data:`_BLOCK` columns, level 2 the max of blocks of level 1, and so on while a level stays
    at least ``4k`` wide. The top-k of a level all lie in the top-k blocks of the level above (a
    block holding one has a max at least the k-th value, and at most ``k`` blocks can), so going
    down from the coarsest level, each step takes the top-k among ``k * _BLOCK`` candidates and
    the values are exactly ``torch.topk``'s; among tied values any valid choice may be returned.
    The result is a deterministic function of each row and differentiable in ``pre`` (through a
    gather), so the dense and fused TopK paths select the same latents.
    """
    rows = pre.shape[0]
    if pre.device.type != "cpu" or not pre.is_contiguous():
        return pre.topk(k, dim=1, sorted=False)
    with torch.no_grad():  # only ids flow out of this block; values are gathered below
        levels = [pre]  # levels[i] is (rows, n / _BLOCK**i); block j of level i + 1 holds
        while (w := levels[-1].shape[1]) % _BLOCK == 0 and w // _BLOCK >= 4 * k:
            # the entries j, j + w', j + 2w', ... of level i (w' = w / _BLOCK)
            levels.append(levels[-1].view(rows, _BLOCK, w // _BLOCK).amax(dim=1))
        cand = None
        if len(levels) > 1:
            ids = levels[-1].topk(k, dim=1, sorted=False).indices  # (rows, k), coarsest level
            for level in range(len(levels) - 2, -1, -1):
                fine, coarse_width = levels[level], levels[level + 1].shape[1]
                offsets = torch.arange(0, fine.shape[1], coarse_width, device=pre.device)
                cand = (ids.unsqueeze(2) + offsets).view(rows, k * _BLOCK)  # ids at this level
                if level > 0:
                    ids = cand.gather(1, fine.gather(1, cand).topk(k, dim=1, sorted=False).indices)
    if cand is None:  # too narrow to narrow down
        return pre.topk(k, dim=1, sorted=False)
    values, j = pre.gather(1, cand).topk(k, dim=1, sorted=False)
    return values, cand.gather(1, j)


def dead_topk_select(pre: Tensor, k: int, live: Tensor) -> Selection:
    """AuxK's selection: the top ``k`` of each row of ``pre`` ``(rows, n)`` among the latents
    not ``live`` (``(n,)`` bool), as ``(values, indices, valid)``, all ``(rows, k)``.

    Overwrites ``pre``'s live columns with ``-inf`` (callers pass a scratch chunk, so no second
    ``(rows, n)`` tensor exists). Where a row has fewer than ``k`` such latents the remaining
    slots hold value 0 and are False in ``valid``, as the dense AuxK zeroes them; the shapes do
    not depend on how many latents are dead, so nothing is read on the host.
    """
    values, indices = topk_select(pre.masked_fill_(live, -torch.inf), k)
    valid = torch.isfinite(values)
    return values.masked_fill(~valid, 0.0), indices, valid


def topk_selection(k: int) -> Callable[[Tensor], Selection]:
    def select(pre: Tensor) -> Selection:
        values, indices = topk_select(pre, k)
        return values, indices, None

    return select


ThresholdFn = Callable[[Tensor], Tensor]
"""Maps the ``(n_keep,)`` largest pre-activations of a batch (any order, the batch's dtype) to
the selection threshold, a 0-dim tensor (BatchTopK: the ``n_keep``-th largest over all DDP
ranks, in fp32 or wider). Entries are compared with it under PyTorch's type promotion, as
``x > t`` is."""

QuotaFn = Callable[[Tensor, Tensor], Tensor]
"""Maps the number of this batch's entries above the threshold (0-dim long) and the flat bool
mask of its entries equal to it to how many of those tied entries are kept, the first in
row-major order (0-dim long, may be negative: none). One process keeps ``n_keep - above``;
under DDP the ranks before this one in the global batch take theirs first."""


class FlatSelection(NamedTuple):
    """A selection with a variable number of entries per row, as one row-major list of a length
    fixed in advance (no shape depends on the data, so nothing is read on the host).

    Padded slots are at the end: value 0, latent 0, in the last row, False in ``valid``.
    """

    values: Tensor
    """``(capacity,)`` the selected entries."""
    indices: Tensor
    """``(capacity,)`` their column (latent) ids."""
    valid: Tensor
    """``(capacity,)`` bool: a real entry, not padding."""
    rows: Tensor
    """``(capacity,)`` the row of each entry, non-decreasing."""
    offsets: Tensor
    """``(batch,)`` the first entry of each row (``F.embedding_bag``'s ``offsets``)."""


def batch_topk_select(
    pre: Tensor,
    n_keep: int,
    *,
    threshold_of: ThresholdFn | None = None,
    quota_of: QuotaFn | None = None,
) -> FlatSelection:
    """BatchTopK: the ``n_keep`` largest entries of ``pre`` ``(rows, n)``, over the whole batch.

    The threshold ``t`` is ``threshold_of(top)`` for ``top`` the ``n_keep`` largest entries
    (default: their minimum). Every entry ``> t`` is kept, and of the entries equal to ``t`` the
    first ``quota_of(above, tied)`` in row-major order (default: as many as make ``n_keep``), so
    exactly ``min(n_keep, rows * n)`` entries are kept whatever the ties: the rule of
    :func:`~sae_lightning.components.sparsity.batchtopk.select_batch_topk`.

    The selection has ``min(n_keep, rows * n)`` slots (:class:`FlatSelection`). It costs one
    top-k over the batch, one comparison of the batch with ``t`` and one fixed-size list of its
    first tied entries; no value is read on the host.
    """
    rows, n = pre.shape
    flat_pre = pre.reshape(-1)
    numel = flat_pre.numel()
    m = min(n_keep, numel)
    if m == 0:
        return _flat(flat_pre, pre.new_zeros(0, dtype=torch.long), rows, n)
    values, flat = topk_select(flat_pre.view(1, -1), m)  # (1, m), unsorted
    values, flat = values[0], flat[0]
    threshold = values.min() if threshold_of is None else threshold_of(values)
    above = values > threshold  # every entry above the threshold is among the m candidates
    n_above = above.sum()
    tied = flat_pre == threshold
    quota = m - n_above if quota_of is None else quota_of(n_above, tied)
    # Kept entries by flat position, row-major; numel marks a slot left empty.
    key = torch.cat([flat.masked_fill(~above, numel), first_kept(tied, m, quota)])
    return _flat(flat_pre, key.sort().values[:m], rows, n)


def kept_by_position(
    values: Tensor, indices: Tensor, threshold: Tensor, quota_of: QuotaFn
) -> Tensor:
    """``(rows, width)`` bool: which entries of a padded selection of every entry at or above
    ``threshold`` the BatchTopK rule keeps (:func:`batch_topk_select`): every entry above it,
    and the first ``quota_of(above, tied)`` equal to it, by row, then latent id."""
    above = values > threshold
    tied = values == threshold
    quota = quota_of(above.sum(), tied)
    key = torch.where(tied, indices, torch.iinfo(torch.long).max)  # ties first, by latent
    order = key.argsort(dim=1, stable=True)
    slots = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, slots)  # a tie's place in its row
    per_row = tied.sum(dim=1)
    before = per_row.cumsum(0) - per_row  # ties in earlier rows
    return above | (tied & (before.unsqueeze(1) + rank < quota))


def rows_of(offsets: Tensor, count: int) -> Tensor:
    """``(count,)`` the row of each entry of a flat row-major list with row starts ``offsets``."""
    entries = torch.arange(count, device=offsets.device)
    return torch.bucketize(entries, offsets, right=True) - 1


def offsets_of(rows: Tensor, batch: int) -> Tensor:
    """``(batch,)`` the first entry of each row of a flat list whose entries' ``rows`` are
    non-decreasing (the inverse of :func:`rows_of`)."""
    return torch.searchsorted(rows, torch.arange(batch, device=rows.device))


def pad_rows(values: Tensor, indices: Tensor, rows: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """A flat row-major list ``(values, indices, rows)`` as ``(batch, width)`` codes padded to the
    widest row (value 0 at latent 0). Zero entries (inactive, padding) are left out; the width
    is read on the host."""
    row = torch.where(values != 0, rows, batch)  # batch: the drop row
    order = row.argsort(stable=True)
    row, indices, values = row[order], indices[order], values[order]
    counts = torch.zeros(batch + 1, dtype=torch.long, device=rows.device)
    counts = counts.index_add_(0, row, torch.ones_like(row))[:batch]
    width = max(int(counts.max()), 1) if batch else 1
    out_values, out_indices, _ = _padded(row, indices, values, counts, batch, width)
    return out_values, out_indices


def first_true(mask: Tensor, count: int) -> Tensor:
    """``(count,)`` positions of the first ``count`` True entries of the flat bool ``mask``, in
    order; ``mask.numel()`` fills the slots past the last one (a fixed-size ``nonzero``)."""
    if mask.device.type == "cuda" and not _STATIC_NONZERO_ON_CUDA:
        return _first_true_by_sort(mask, count)
    return torch.nonzero_static(mask, size=count, fill_value=mask.numel()).view(-1)


def first_kept(mask: Tensor, count: int, quota: Tensor) -> Tensor:
    """:func:`first_true`, keeping only the first ``quota`` (0-dim, may be negative) positions:
    ``mask.numel()`` in every other slot. BatchTopK's tied entries that are kept."""
    slots = torch.arange(count, device=mask.device)
    return torch.where(slots < quota, first_true(mask, count), mask.numel())


def _first_true_by_sort(mask: Tensor, count: int) -> Tensor:
    """:func:`first_true` by a stable sort (True first, each group in order of position)."""
    order = torch.argsort(mask.to(torch.int8), descending=True, stable=True)[:count]
    return torch.where(mask[order], order, mask.numel())


_STATIC_NONZERO_ON_CUDA = TorchVersion(torch.__version__) >= "2.6"
"""``torch.nonzero_static`` runs on CUDA without a host sync from torch 2.6 on."""


def _flat(flat_pre: Tensor, key: Tensor, rows: int, n: int) -> FlatSelection:
    """The :class:`FlatSelection` of the sorted flat positions ``key`` (``rows * n``: empty)."""
    valid = key < rows * n
    key = torch.where(valid, key, (rows - 1) * n)  # padding: latent 0 of the last row
    row = torch.div(key, n, rounding_mode="floor")
    values = flat_pre.index_select(0, key).masked_fill(~valid, 0.0)
    return FlatSelection(values, key - row * n, valid, row, offsets_of(row, rows))


def threshold_select(
    pre: Tensor, threshold: Tensor | float, *, inclusive: bool = False, positive: bool = False
) -> Selection:
    """Every entry of ``pre`` ``(rows, n)`` above ``threshold`` (at or above: ``inclusive``),
    padded to the widest row (padded slots: value 0 at latent 0, False in ``valid``; the width
    is read on the host); ``positive``: also ``> 0``.

    The comparison follows PyTorch's type promotion (a 0-dim fp32 threshold is compared in
    ``pre``'s dtype), as the dense ``acts > threshold`` does.
    """
    rows = pre.shape[0]
    mask = pre >= threshold if inclusive else pre > threshold
    if positive:
        mask &= pre > 0
    row, col = mask.nonzero(as_tuple=True)  # row-major: sorted by row
    counts = torch.bincount(row, minlength=rows)
    width = max(int(counts.max()), 1)
    return _padded(row, col, pre[row, col], counts, rows, width)


def _padded(
    row: Tensor,
    col: Tensor,
    values: Tensor,
    counts: Tensor,
    rows: int,
    width: int,
) -> Selection:
    """``(rows, width)`` values, ids and validity from entries ``(row, col, values)`` sorted by
    row; ``counts`` holds the entries per row, and entries with ``row == rows`` are dropped.
    Slots are filled in the order of the entries.
    """
    starts = counts.cumsum(0) - counts  # (rows,) first entry of each row
    starts = torch.cat([starts, starts.new_zeros(1)])  # the drop row
    slot = torch.arange(row.numel(), device=row.device) - starts[row]
    # One slot past the last real one takes every dropped entry, then is cut off.
    pos = torch.where(row < rows, row * width + slot, rows * width)
    out_values = values.new_zeros(rows * width + 1)
    out_indices = torch.zeros(rows * width + 1, dtype=torch.long, device=row.device)
    valid = torch.zeros(rows * width + 1, dtype=torch.bool, device=row.device)
    out_values[pos] = values
    out_indices[pos] = col
    valid[pos] = row < rows
    cut = rows * width
    return (
        out_values[:cut].view(rows, width),
        out_indices[:cut].view(rows, width),
        valid[:cut].view(rows, width),
    )


def concat(parts: list[Selection]) -> Selection:
    """The selections of consecutive row chunks as one, padding them to a common width."""
    if len(parts) == 1:
        return parts[0]
    width = max(p[0].shape[1] for p in parts)
    if parts[0][2] is None or all(p[0].shape[1] == width for p in parts):
        valid = None if parts[0][2] is None else torch.cat([p[2] for p in parts])  # type: ignore[misc]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), valid

    def pad(t: Tensor) -> Tensor:
        return F.pad(t, (0, width - t.shape[1]))  # zeros: value 0, latent 0, not valid

    return tuple(torch.cat([pad(p[i]) for p in parts]) for i in range(3))  # type: ignore[return-value]
