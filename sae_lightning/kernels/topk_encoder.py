"""Encoder product + top-k selection whose backward touches only the selected latents.

For a TopK SAE the only unavoidable dense work is the encoder product ``x @ W_enc.T``
(``2 * batch * d_in * d_sae`` FLOPs). Differentiating through the dense ``(batch, d_sae)``
pre-activations costs two more products of that size (the gradients of ``x`` and ``W_enc``).
Only ``k`` entries per row were selected, so with ``g`` the ``(batch, k)`` gradient of the
selected values and ``idx`` their latent ids, the backward needs ``batch * k * d_in`` work:

- ``grad_W[i] = sum over (b, j) with idx[b, j] == i of g[b, j] x[b]``: the pairs sorted by
  latent, each touched row accumulated once, no ``(batch, k, d_in)`` tensor
  (:func:`sparse_weight_grad`);
- ``grad_b[i]``: an ``index_add_`` of ``batch * k`` scalars;
- the input's gradient only where it is needed: for the centring shift ``b_dec`` it is
  ``-grad_b @ W``, for ``x`` itself an ``embedding_bag`` gather of ``k`` rows.

The forward computes the product in row chunks of at most :data:`DEFAULT_CHUNK_BYTES` and keeps
only the selected ``(batch, k)`` values and ids, so no ``(batch, d_sae)`` tensor outlives it.
:class:`SparseDecode` is the decoder's gather with a backward built the same way. The same code
runs on CPU and CUDA.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_CHUNK_BYTES = 64 * 2**20
"""Largest pre-activation chunk the CPU forward materialises. Fewer, larger chunks amortise the
matrix product's packing of ``W_enc``: at d_in 768, d_sae 16384, batch 4096, 16 MiB chunks were
6% slower than 64 MiB, and 128 MiB or the whole batch no faster (docs/performance.md)."""

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


def _topk_selection(k: int) -> Callable[[Tensor], Selection]:
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


class TopKEncoder(torch.autograd.Function):
    """``select((x - shift) @ weight[rows].T + bias[rows])``, backward over selected pairs only.

    ``forward(x, shift, weight, bias, select, rows, chunk_rows) -> (values, indices)``, with the
    tensors of :class:`EncoderInputs`; ``select`` maps a ``(rows, n)`` block of pre-activations
    to a :data:`Selection`; ``rows`` (optional ``(n,)`` latent ids) restricts the product to
    those latents (AuxK's dead ones); ``chunk_rows`` (None: the whole batch) bounds the rows
    multiplied at once, and must be None for a selection across rows (BatchTopK). ``indices``
    are global latent ids and carry no gradient; padded slots of ``values`` are 0 and pass no
    gradient. The gradient of ``shift`` is ``-grad_bias @ weight``, a matrix-vector product,
    so no per-row input gradient is formed unless ``x`` itself requires one.
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
            values, indices, valid = select(_affine(x_enc, w, b))
        else:
            with _WORKSPACE.borrow(step * w.shape[0], x) as buf:
                chunk = buf.view(step, w.shape[0])  # (step, n), reused by every chunk
                parts = [
                    select(_affine(x_enc[i : i + step], w, b, out=chunk[: min(step, batch - i)]))
                    for i in range(0, batch, step)
                ]
            values, indices, valid = _concat(parts)
        if rows is not None:
            indices = rows[indices]
        ctx.save_for_backward(x_enc, weight, indices, valid)
        ctx.has_shift = shift is not None
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(
        ctx: Any, grad_values: Tensor, grad_indices: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        x_enc, weight, indices, valid = ctx.saved_tensors
        need_x, need_shift, need_w, need_b = ctx.needs_input_grad[:4]
        g = grad_values.to(weight.dtype)
        if valid is not None:
            g = g * valid
        g = g.contiguous()  # (batch, k)
        grad_x = grad_shift = grad_w = grad_b = None
        if need_x:
            # (batch, k) ids and weights -> (batch, d_in): sum_j g[b, j] W[idx[b, j]]
            grad_x = F.embedding_bag(indices, weight, per_sample_weights=g, mode="sum")
        if need_w:
            grad_w = sparse_weight_grad(indices, g, x_enc.to(weight.dtype), weight.shape[0])
        if (ctx.has_bias and need_b) or (ctx.has_shift and need_shift):
            per_latent = weight.new_zeros(weight.shape[0])  # (d_sae,) sum of g per latent
            per_latent.index_add_(0, indices.reshape(-1), g.reshape(-1))
            if ctx.has_bias and need_b:
                grad_b = per_latent
            if ctx.has_shift and need_shift:
                # sum_b grad_x[b] = per_latent @ W; the shift enters with a minus sign.
                grad_shift = -(per_latent @ weight)
        return grad_x, grad_shift, grad_w, grad_b, None, None, None


def _concat(parts: list[Selection]) -> Selection:
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


class _Workspace:
    """One CPU buffer for pre-activation chunks, kept from step to step.

    A fresh multi-megabyte tensor is a fresh ``mmap``: its pages fault in on first touch, which
    cost as much as a fifth of the product itself. Only the selection reads the chunks, and it
    returns new tensors, so nothing outside :class:`TopKEncoder` ever sees this memory. Buffers
    above :data:`DEFAULT_CHUNK_BYTES` (BatchTopK's whole batch) and a concurrent caller (another
    thread) get a temporary buffer instead.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buf: Tensor | None = None

    def borrow(self, numel: int, like: Tensor) -> _Borrowed:
        """A ``(numel,)`` buffer of ``like``'s dtype and device, kept when small enough."""
        keep = like.device.type == "cpu" and numel * like.element_size() <= DEFAULT_CHUNK_BYTES
        if keep and self._lock.acquire(blocking=False):
            buf = self._buf
            if buf is None or buf.numel() < numel or buf.dtype != like.dtype:
                buf = self._buf = torch.empty(numel, dtype=like.dtype)
            return _Borrowed(buf[:numel], self._lock)
        return _Borrowed(like.new_empty(numel), None)

    def release(self) -> None:
        """Free the kept buffer (it is allocated again by the next CPU forward)."""
        with self._lock:
            self._buf = None


class _Borrowed:
    def __init__(self, buf: Tensor, lock: threading.Lock | None) -> None:
        self.buf, self.lock = buf, lock

    def __enter__(self) -> Tensor:
        return self.buf

    def __exit__(self, *exc: object) -> None:
        if self.lock is not None:
            self.lock.release()


_WORKSPACE = _Workspace()


def release_workspace() -> None:
    """Free the CPU buffers kept between steps: the pre-activation chunk and the gradients."""
    _WORKSPACE.release()
    _GRADIENTS.release()


class SparseDecode(torch.autograd.Function):
    """``out[b] = sum_j values[b, j] * atoms[indices[b, j]]``, as ``F.embedding_bag``.

    ``forward(indices, values, atoms) -> (batch, d_in)``. The backward computes the same
    gradients as ``embedding_bag``'s, but also in bfloat16 on CUDA, where ATen has no kernel for
    the gradient of ``per_sample_weights``: there ``grad_values[b, j] = grad[b] . atoms[idx]``
    is a batched matrix-vector product over gathered atoms, in chunks of at most
    :data:`DEFAULT_CHUNK_BYTES`.
    """

    @staticmethod
    def forward(ctx: Any, indices: Tensor, values: Tensor, atoms: Tensor) -> Tensor:
        values = values.to(atoms.dtype)
        ctx.save_for_backward(indices, values, atoms)
        return F.embedding_bag(indices, atoms, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        indices, values, atoms = ctx.saved_tensors
        grad = grad.contiguous()
        grad_values = grad_atoms = None
        if ctx.needs_input_grad[1]:
            grad_values = sampled_dots(grad, atoms, indices)
        if ctx.needs_input_grad[2]:
            grad_atoms = sparse_weight_grad(indices, values, grad, atoms.shape[0])
        return None, grad_values, grad_atoms


def sparse_decode(indices: Tensor, values: Tensor, atoms: Tensor) -> Tensor:
    """``(batch, k)`` ids and weights -> ``(batch, d_in)``: the sum of ``k`` weighted atoms."""
    return SparseDecode.apply(indices, values, atoms)


def sampled_dots(rows: Tensor, atoms: Tensor, indices: Tensor) -> Tensor:
    """``(batch, k)`` with entry ``[b, j] = rows[b] . atoms[indices[b, j]]``.

    Args:
        rows: ``(batch, d)``; atoms: ``(n, d)``; indices: ``(batch, k)`` ids into ``atoms``.
    """
    batch, k = indices.shape
    if rows.device.type != "cuda":
        offsets = torch.arange(0, batch * k, k, device=rows.device)
        offset2bag = torch.arange(batch, device=rows.device).repeat_interleave(k)
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(
            rows, atoms, indices.reshape(-1), offsets, offset2bag, 0, -1
        ).view(batch, k)
    return _sampled_dots_gathered(rows, atoms, indices)


def _sampled_dots_gathered(rows: Tensor, atoms: Tensor, indices: Tensor) -> Tensor:
    """:func:`sampled_dots` as batched matrix-vector products over gathered atoms, chunked."""
    batch, k = indices.shape
    per_row = max(1, DEFAULT_CHUNK_BYTES // max(1, k * atoms.shape[1] * atoms.element_size()))
    out = []
    for i in range(0, batch, per_row):
        gathered = atoms[indices[i : i + per_row]]  # (rows, k, d)
        out.append(torch.bmm(gathered, rows[i : i + per_row].unsqueeze(2)).squeeze(2))
    return torch.cat(out)


def _affine(x: Tensor, w: Tensor, b: Tensor | None, out: Tensor | None = None) -> Tensor:
    """``x @ w.T + b`` into ``out`` when given: ``(rows, d_in) -> (rows, n)``."""
    if b is None:
        return torch.mm(x, w.t(), out=out)
    return torch.addmm(b, x, w.t(), out=out)


def sparse_weight_grad(indices: Tensor, weights: Tensor, x: Tensor, num_rows: int) -> Tensor:
    """``(num_rows, d)`` with row ``i`` = sum over ``(b, j)`` where ``indices[b, j] == i`` of
    ``weights[b, j] * x[b]``; ``indices``/``weights`` are ``(batch, k)``, ``x`` ``(batch, d)``.

    This is ``G.T @ x`` for the ``(batch, num_rows)`` matrix ``G`` holding ``weights`` at
    ``indices``, computed from the pairs sorted by row, so that each touched row is accumulated
    once and no ``(batch, k, d)`` products exist. On CPU the pairs become a CSR matrix multiplied
    into a gradient buffer recycled from the previous step (:class:`_GradientPool`); elsewhere
    ATen's embedding-bag weight gradient does the same into fresh memory. Falls back to autograd
    through ``embedding_bag`` if the private ATen entry point is unavailable.
    """
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return _weight_grad_csr(indices, weights, x, num_rows)
    if _DENSE_BACKWARD is not None:
        return _weight_grad_dense_backward(indices, weights, x, num_rows)
    return _weight_grad_by_autograd(indices, weights, x, num_rows)


def _weight_grad_csr(indices: Tensor, weights: Tensor, x: Tensor, num_rows: int) -> Tensor:
    batch, k = indices.shape
    rows, order = indices.reshape(-1).sort(stable=True)  # pairs grouped by row
    crow = torch.zeros(num_rows + 1, dtype=torch.long, device=x.device)
    torch.cumsum(torch.bincount(rows, minlength=num_rows), 0, out=crow[1:])
    cols = torch.div(order, k, rounding_mode="floor")  # the batch row of each pair
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        g = torch.sparse_csr_tensor(
            crow, cols, weights.reshape(-1)[order], (num_rows, batch), check_invariants=False
        )
    out = _GRADIENTS.take((num_rows, x.shape[1]), x)
    torch.addmm(out, g, x, beta=0, out=out)
    return out.detach()  # a new handle: autograd may keep it as .grad without copying


def _weight_grad_dense_backward(
    indices: Tensor, weights: Tensor, x: Tensor, num_rows: int
) -> Tensor:
    batch, k = indices.shape
    offset2bag = torch.arange(batch, device=x.device).repeat_interleave(k)  # (batch * k,)
    bag_size = torch.full((batch,), k, dtype=torch.long, device=x.device)
    max_indices = torch.empty(0, dtype=torch.long, device=x.device)  # unused by mode "sum"
    assert _DENSE_BACKWARD is not None
    return _DENSE_BACKWARD(
        x.contiguous(),
        indices.reshape(-1),
        offset2bag,
        bag_size,
        max_indices,
        num_rows,
        False,  # scale_grad_by_freq
        0,  # mode "sum"
        weights.reshape(-1),
        -1,  # padding_idx: none
    )


class _GradientPool:
    """Weight-gradient matrices reused from step to step, once nothing else holds them.

    Each step's ``(d_sae, d_in)`` gradients would otherwise be fresh ``mmap``s, zeroed and
    page-faulted in (half the cost of the sparse weight gradient on CPU). A pooled buffer is
    handed out again only when no tensor other than the pool references its storage: after
    ``optimizer.zero_grad(set_to_none=True)`` dropped the ``.grad`` that shared it. A gradient
    still held (accumulation across micro-batches, ``set_to_none=False``, a user's reference)
    makes the pool allocate a new buffer, so results never depend on the pool.
    """

    _MAX_PER_SHAPE = 4

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bufs: dict[tuple[Any, ...], list[tuple[Tensor, int]]] = {}

    def take(self, shape: tuple[int, int], like: Tensor) -> Tensor:
        """A ``shape`` buffer like ``like`` (uninitialised): a free pooled one or a new one."""
        if not _CAN_COUNT_REFS:  # pragma: no cover - torch builds without the counter
            return like.new_empty(shape)
        key = (shape, like.dtype, like.device)
        with self._lock:
            pool = self._bufs.setdefault(key, [])
            for buf, alone in pool:
                if _storage_refs(buf) == alone:
                    return buf
            buf = like.new_empty(shape)
            if len(pool) < self._MAX_PER_SHAPE:
                pool.append((buf, _storage_refs(buf)))
            return buf

    def release(self) -> None:
        with self._lock:
            self._bufs.clear()


def _storage_refs(t: Tensor) -> int:
    """References to ``t``'s storage (tensors and views sharing it, plus its Python handle)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


_CAN_COUNT_REFS = hasattr(torch._C, "_storage_Use_Count")

_GRADIENTS = _GradientPool()


def _weight_grad_by_autograd(indices: Tensor, weights: Tensor, x: Tensor, num_rows: int) -> Tensor:
    w = torch.zeros(num_rows, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    with torch.enable_grad():
        out = F.embedding_bag(indices, w, per_sample_weights=weights, mode="sum")
        (grad,) = torch.autograd.grad(out, w, x)
    return grad


def _find_dense_backward() -> Callable[..., Tensor] | None:
    try:
        return torch.ops.aten._embedding_bag_dense_backward  # type: ignore[no-any-return]
    except (AttributeError, RuntimeError):  # pragma: no cover - depends on the torch build
        return None


_DENSE_BACKWARD = _find_dense_backward()


def default_chunk_rows(batch: int, n: int, element_size: int, device: torch.device) -> int | None:
    """Rows per chunk so a pre-activation chunk stays under :data:`DEFAULT_CHUNK_BYTES` on CPU.

    On accelerators the caching allocator recycles memory and one big product is fastest, so
    the whole batch goes at once (None).
    """
    if device.type != "cpu":
        return None
    rows = max(1, DEFAULT_CHUNK_BYTES // max(1, n * element_size))
    return None if rows >= batch else rows


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
    return TopKEncoder.apply(x, shift, weight, bias, _topk_selection(k), rows, chunk_rows)


def batch_topk_encode(
    inputs: EncoderInputs,
    n_keep: int,
    *,
    threshold_of: ThresholdFn | None = None,
    positive: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """BatchTopK of the encoder's pre-activations (:func:`batch_topk_select`).

    The whole ``(batch, d_sae)`` product exists at once here (the selection spans rows).

    Args:
        inputs: the linear encoder's input, weight and bias.
        n_keep: entries kept over the batch before ties (``k * batch``, times the DDP world).
        threshold_of, positive: as for :func:`batch_topk_select`.

    Returns:
        ``(values, indices, valid)``, each ``(batch, width)`` with ``width`` the most entries
        any row kept; padded slots have value 0, latent 0 and ``valid`` False.
    """

    def select(pre: Tensor) -> Selection:
        return batch_topk_select(pre, n_keep, threshold_of=threshold_of, positive=positive)

    return _encode_padded(inputs, select, None)


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

    return _encode_padded(inputs, select, chunk_rows)


def _encode_padded(
    inputs: EncoderInputs, select: Callable[[Tensor], Selection], chunk_rows: int | None
) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`TopKEncoder` with a padding selection; also returns the validity mask."""
    parts: list[Selection] = []

    def recording(pre: Tensor) -> Selection:
        parts.append(select(pre))
        return parts[-1]

    values, indices = TopKEncoder.apply(*inputs, recording, None, chunk_rows)
    valid = _concat(parts)[2]
    assert valid is not None
    return values, indices, valid
