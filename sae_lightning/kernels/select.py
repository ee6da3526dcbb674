"""Selections: which pre-activations a sparsity keeps, as ``(values, indices, valid)``.

TopK keeps the ``k`` largest per row (:func:`topk_select`); BatchTopK every entry at or above a
batch-wide threshold (:func:`batch_topk_select`) and, at inference, above a fixed one
(:func:`threshold_select`). Rows of a variable number of entries are padded to a common width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

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
the selection threshold, a 0-dim tensor (BatchTopK: their minimum over all DDP ranks, in fp32
or wider). Entries are compared with it under PyTorch's type promotion, as ``x >= t`` is."""


def batch_topk_select(
    pre: Tensor, n_keep: int, *, threshold_of: ThresholdFn | None = None, positive: bool = False
) -> Selection:
    """BatchTopK: every entry of ``pre`` ``(rows, n)`` at or above a batch-wide threshold.

    The threshold is ``threshold_of(top)`` for ``top`` the ``n_keep`` largest entries of the
    batch (default: their minimum, so that the ``n_keep`` largest are kept). Entries tied with it
    are all kept, as the dense rule ``x >= threshold`` keeps them; ``positive`` keeps only
    entries above zero too (ReLU'd codes). The ``n_keep + 1`` largest entries are found once; if
    the smallest of them is below the threshold, they hold every entry kept, otherwise ties
    reach past them and the whole batch is compared with the threshold.

    Rows keep a variable number of entries, so they are padded to the widest row: padded slots
    hold value 0 at latent 0 and are False in ``valid``. On accelerators this reads two numbers
    from the device at once (one host sync, for the width), more when ties reach past the
    candidates.

    Args:
        pre: ``(rows, n)`` pre-activations.
        n_keep: entries to keep before ties (``k * global batch`` for BatchTopK).
        threshold_of: computes the threshold from the top values (a collective under DDP).
        positive: also require entries ``> 0``.
    """
    rows, n = pre.shape
    numel = pre.numel()
    m = min(n_keep, numel)
    probe = m < numel  # select one more entry than kept: it tells whether ties go further
    values, flat = topk_select(pre.reshape(1, -1), m + int(probe))  # (1, m [+ 1]) unsorted
    values, flat = values[0], flat[0]
    # Nothing below waits for the device until the one read of (spill, width).
    top = values
    if probe:  # without one smallest entry: the multiset of the m largest
        skip = torch.arange(m, device=pre.device)
        top = values[skip + (skip >= values.argmin()).long()]  # a gather, not a boolean mask
    threshold = top.min() if threshold_of is None else threshold_of(top)
    admitted = _admitted(values, threshold, positive)  # (m [+ 1],)
    # Ties reach past the candidates if their smallest is kept: every other entry is <= it.
    spill = _admitted(values.min(), threshold, positive) if probe else admitted.new_zeros(())
    row = torch.where(admitted, torch.div(flat, n, rounding_mode="floor"), rows)
    counts = torch.zeros(rows + 1, dtype=torch.long, device=pre.device)  # bincount would sync
    counts = counts.index_add_(0, row, torch.ones_like(row))[:rows]  # kept per row
    ties_beyond, width = torch.stack([spill.long(), counts.max()]).tolist()
    if ties_beyond:  # ties at the threshold reach past the candidates
        return threshold_select(pre, threshold, inclusive=True, positive=positive)
    return _padded(row, flat - row * n, values, counts, rows, max(width, 1))


def threshold_select(
    pre: Tensor, threshold: Tensor | float, *, inclusive: bool = False, positive: bool = False
) -> Selection:
    """Every entry of ``pre`` ``(rows, n)`` above ``threshold`` (at or above: ``inclusive``),
    padded to the widest row as :func:`batch_topk_select` pads; ``positive``: also ``> 0``.

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
    return _padded(row, col, pre[row, col], counts, rows, width, sorted_rows=True)


def _admitted(values: Tensor, threshold: Tensor, positive: bool) -> Tensor:
    keep = values >= threshold
    return keep & (values > 0) if positive else keep


def _padded(
    row: Tensor,
    col: Tensor,
    values: Tensor,
    counts: Tensor,
    rows: int,
    width: int,
    *,
    sorted_rows: bool = False,
) -> Selection:
    """``(rows, width)`` values, ids and validity from entries ``(row, col, values)``.

    Entries with ``row == rows`` are dropped (not admitted); ``counts`` holds the kept entries
    per row. Slots are filled in the order of the entries within each row.
    """
    if not sorted_rows:
        order = row.argsort(stable=True)
        row, col, values = row[order], col[order], values[order]
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
