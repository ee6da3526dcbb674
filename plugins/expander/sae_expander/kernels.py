"""Products with a d-sparse masked matrix stored as ``(values, rows)``, in ``O(batch * d * d_sae)``.

The matrix is ``A`` of shape ``(d_sae, d_in)`` with ``A[j, rows[j, s]] = w[j, s]`` and zeros
elsewhere (one atom per row, ``d`` nonzeros each). Nothing here ever builds ``A`` densely:

- ``A x``    (encoder):  per latent, gather ``d`` inputs and reduce -> ``F.embedding_bag`` with
  the transposed batch as the table and the latents as bags;
- ``Aᵀ h``   (dense-code decoder and the encoder's input gradient): the same with bags per input
  row, through a precomputed row-sorted copy of the mask (:class:`MaskLayout`);
- ``∂/∂w``   (sampled dense-dense product): ``sum_b g[b, j] x[b, rows[j, s]]``.

When the upstream gradient is sparse (TopK keeps ``k`` of ``d_sae`` per row), the backward pass
works on its ``nnz`` entries only, in ``O(nnz * d)``; otherwise it uses the dense kernels above.
On CPU the batch is processed in chunks whose gather table fits in cache, which measured about
2x faster than one call (benchmarks/expander_speed.py reports the resulting step time).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

SPARSE_GRADIENT_DENSITY = 1 / 16
"""Backward passes whose upstream gradient has at most this fraction of nonzeros take the
sparse ``O(nnz * d)`` path; denser ones take the chunked dense kernels."""

_SDDMM_ELEMENTS = 1 << 22
"""On CPU, the dense gradient kernel gathers at most about this many inputs at a time."""

_NNZ_ELEMENTS = 1 << 20
"""Sparse kernels work through their entries in chunks with about this many gathered values."""

_SCAN_ELEMENTS = 1 << 17
"""On CPU, gradients are scanned for nonzeros in row chunks of about this many elements."""

_CPU_TABLE_ELEMENTS = 1 << 16
"""On CPU, batch chunks are sized so that the gather table (rows x chunk) holds about this
many elements (256 KiB in float32), i.e. stays in L2 cache."""


class MaskLayout(NamedTuple):
    """The mask in both orientations, derived once from ``rows``."""

    rows: Tensor
    """``(d_sae, d)`` int64 input row of every stored value."""
    by_input_latent: Tensor
    """``(d_sae * d,)`` int64 latent of each stored value, ordered by input row."""
    by_input_slot: Tensor
    """``(d_sae * d,)`` int64 position in ``w.flatten()`` of each entry of ``by_input_latent``."""
    by_input_offsets: Tensor
    """``(d_in,)`` int64 start of each input row's entries in ``by_input_latent``."""
    bags: Tensor
    """``(d_sae, d + 1)`` int32 ``rows``, then ``d_in``: the fused encoder's gather indices, whose
    last entry reads a constant-one row holding the bias (int32 halves what each gather reads,
    measured 7% faster)."""
    d_in: int
    """Number of input rows."""

    @classmethod
    def from_rows(cls, rows: Tensor, d_in: int) -> MaskLayout:
        rows = rows.long()
        d = rows.shape[1]
        slot = torch.argsort(rows.reshape(-1), stable=True)  # (d_sae * d,)
        counts = torch.bincount(rows.reshape(-1), minlength=d_in)
        offsets = torch.cumsum(counts, 0) - counts
        bags = F.pad(rows, (0, 1), value=d_in).int()
        return cls(rows, slot // d, slot, offsets, bags, d_in)

    @property
    def d_sae(self) -> int:
        return self.rows.shape[0]

    def latents(self, ids: Tensor) -> MaskLayout:
        """The mask of the latents ``ids`` ``(n,)`` alone, for the fused encoder only: the
        by-input orientation is left empty (nothing that reads it runs on a subset)."""
        empty = ids.new_zeros(0)
        return MaskLayout(self.rows[ids], empty, empty, empty, self.bags[ids], self.d_in)


def _chunk(batch: int, table_rows: int, device: torch.device) -> int:
    if device.type != "cpu":
        return max(batch, 1)
    return max(8, _CPU_TABLE_ELEMENTS // max(table_rows, 1))


def apply_a(x: Tensor, w: Tensor, layout: MaskLayout, bias: Tensor | None = None) -> Tensor:
    """``(batch, d_in) -> (batch, d_sae)``: ``x @ Aᵀ (+ bias)``, no autograd."""
    batch = x.shape[0]
    out = x.new_empty(batch, layout.d_sae)
    step = _chunk(batch, layout.d_in, x.device)
    for s in range(0, batch, step):
        table = x[s : s + step].t().contiguous()  # (d_in, chunk)
        # bag j sums table[rows[j, :]] weighted by w[j, :] -> (d_sae, chunk)
        out[s : s + step] = F.embedding_bag(
            layout.rows, table, per_sample_weights=w, mode="sum"
        ).t()
    # Added after the transposing copies: fusing it into them measured up to 3x slower.
    return out if bias is None else out.add_(bias)


def apply_at(h: Tensor, w: Tensor, layout: MaskLayout) -> Tensor:
    """``(batch, d_sae) -> (batch, d_in)``: ``h @ A``, no autograd."""
    batch = h.shape[0]
    out = h.new_empty(batch, layout.d_in)
    weights = w.reshape(-1)[layout.by_input_slot]  # (d_sae * d,) ordered by input row
    step = _chunk(batch, layout.d_sae, h.device)
    for s in range(0, batch, step):
        table = h[s : s + step].t().contiguous()  # (d_sae, chunk)
        out[s : s + step] = F.embedding_bag(
            layout.by_input_latent,
            table,
            layout.by_input_offsets,
            per_sample_weights=weights,
            mode="sum",
        ).t()
    return out


def sddmm(g: Tensor, x: Tensor, layout: MaskLayout) -> Tensor:
    """``(d_sae, d)``: ``out[j, s] = sum_b g[b, j] * x[b, rows[j, s]]``, dense kernel, no autograd.

    Args:
        g: ``(batch, d_sae)``.
        x: ``(batch, d_in)``.
    """
    batch = g.shape[0]
    n, d = layout.rows.shape
    out = g.new_zeros(n, d)
    step = max(1, _SDDMM_ELEMENTS // max(n * d, 1)) if g.device.type == "cpu" else max(batch, 1)
    for s in range(0, batch, step):
        gathered = x[s : s + step].t()[layout.rows]  # (d_sae, d, chunk)
        out += torch.bmm(gathered, g[s : s + step].t().unsqueeze(-1)).squeeze(-1)
    return out


class SparseEntries(NamedTuple):
    """The nonzero entries of a ``(batch, d_sae)`` matrix."""

    batch: Tensor
    """``(nnz,)`` row of each entry."""
    latent: Tensor
    """``(nnz,)`` latent of each entry."""
    value: Tensor
    """``(nnz,)`` the entries."""


def sparse_entries(g: Tensor) -> SparseEntries | None:
    """The nonzeros of ``g`` when they are few enough for the sparse path, else None.

    Rows are scanned in cache-sized chunks (measured 2x faster than one ``nonzero`` call on a
    ``(2048, 16384)`` gradient) and the scan stops at the first chunk that is too dense. On
    GPU, ``nonzero`` is one host sync per call.
    """
    batch, n = g.shape
    step = max(1, _SCAN_ELEMENTS // max(n, 1)) if g.device.type == "cpu" else max(batch, 1)
    bs, js, vs = [g.new_zeros(0, dtype=torch.long)], [g.new_zeros(0, dtype=torch.long)], [g[:0, 0]]
    for s in range(0, batch, step):
        chunk = g[s : s + step]
        b, j = chunk.nonzero(as_tuple=True)
        if b.numel() > SPARSE_GRADIENT_DENSITY * chunk.numel():
            return None  # too dense: stop scanning, the dense kernels are cheaper
        bs.append(b + s)
        js.append(j)
        vs.append(chunk[b, j])
    return SparseEntries(torch.cat(bs), torch.cat(js), torch.cat(vs))


def entries_of(indices: Tensor, values: Tensor) -> SparseEntries:
    """The entries of sparse codes: ``values[b, t]`` at latent ``indices[b, t]``."""
    batch, k = indices.shape
    rows = torch.arange(batch, device=indices.device).repeat_interleave(k)
    return SparseEntries(rows, indices.reshape(-1), values.reshape(-1))


def _entry_chunks(e: SparseEntries, d: int):
    """Slices of ``e`` whose ``(chunk, d)`` temporaries hold about ``_NNZ_ELEMENTS`` values."""
    step = max(1, _NNZ_ELEMENTS // max(d, 1))
    for s in range(0, e.value.numel(), step):
        yield SparseEntries(e.batch[s : s + step], e.latent[s : s + step], e.value[s : s + step])


def sparse_apply_at(e: SparseEntries, w: Tensor, layout: MaskLayout, batch: int) -> Tensor:
    """``(batch, d_in)``: ``g @ A`` from the nonzeros of ``g``."""
    m = layout.d_in
    out = w.new_zeros(batch * m)
    for c in _entry_chunks(e, w.shape[1]):
        flat = (c.batch * m).unsqueeze(1) + layout.rows[c.latent]  # (chunk, d) into (batch * d_in)
        out.index_add_(0, flat.reshape(-1), (c.value.unsqueeze(1) * w[c.latent]).reshape(-1))
    return out.view(batch, m)


def sparse_sddmm(e: SparseEntries, x: Tensor, layout: MaskLayout) -> Tensor:
    """``(d_sae, d)``: :func:`sddmm` from the nonzeros of ``g``."""
    m = layout.d_in
    out = x.new_zeros(layout.rows.shape)
    flat_x = x.reshape(-1)
    for c in _entry_chunks(e, layout.rows.shape[1]):
        gathered = flat_x[(c.batch * m).unsqueeze(1) + layout.rows[c.latent]]  # (chunk, d)
        out.index_add_(0, c.latent, c.value.unsqueeze(1) * gathered)
    return out


def _take(t: Tensor, idx: Tensor) -> Tensor:
    """``t[idx]`` for ``t`` ``(n, d)`` and ``idx`` ``(rows, K)``: ``(rows, K, d)``, by
    ``index_select`` (whole ``d``-wide rows copied, much faster than advanced indexing)."""
    return t.index_select(0, idx.reshape(-1)).view(*idx.shape, t.shape[1])


def _code_step(width: int, d: int) -> int:
    """Rows per chunk so that ``(rows, width, d)`` temporaries hold about ``_NNZ_ELEMENTS``."""
    return max(1, _NNZ_ELEMENTS // max(width * d, 1))


def gather_selected(x: Tensor, w: Tensor, indices: Tensor, layout: MaskLayout) -> Tensor:
    """``(batch, k)``: ``(x @ Aᵀ).gather(1, indices)`` in ``O(batch * k * d)``, no autograd."""
    batch, k = indices.shape
    d = layout.rows.shape[1]
    out = x.new_empty(batch, k)
    step = _code_step(k, d)
    for s in range(0, batch, step):
        idx = indices[s : s + step]  # (chunk, k)
        rows = _take(layout.rows, idx)  # (chunk, k, d)
        gathered = x[s : s + step].gather(1, rows.flatten(1)).view(rows.shape)
        out[s : s + step] = (gathered * _take(w, idx)).sum(dim=-1)
    return out


def codes_decode(values: Tensor, indices: Tensor, w: Tensor, layout: MaskLayout) -> Tensor:
    """``(batch, d_in)``: ``sum_t values[b, t] * A[indices[b, t]]``, a per-row scatter of
    ``k * d`` products, ``O(batch * k * d)``, no autograd."""
    batch, k = indices.shape
    d = layout.rows.shape[1]
    out = w.new_zeros(batch, layout.d_in)
    step = _code_step(k, d)
    for s in range(0, batch, step):
        idx = indices[s : s + step]
        products = values[s : s + step].unsqueeze(2).to(w.dtype) * _take(w, idx)
        out[s : s + step].scatter_add_(1, _take(layout.rows, idx).flatten(1), products.flatten(1))
    return out


def codes_value_grad(indices: Tensor, g: Tensor, x: Tensor, layout: MaskLayout) -> Tensor:
    """``(d_sae, d)``: ``out[j, s] = sum over (b, t) with indices[b, t] == j of
    g[b, t] * x[b, rows[j, s]]``, the value gradient of sparse codes, ``O(batch * k * d)``."""
    batch, k = indices.shape
    d = layout.rows.shape[1]
    out = x.new_zeros(layout.rows.shape)
    step = _code_step(k, d)
    for s in range(0, batch, step):
        idx = indices[s : s + step]
        rows = _take(layout.rows, idx)  # (chunk, k, d)
        gathered = x[s : s + step].gather(1, rows.flatten(1)).view(rows.shape)
        products = g[s : s + step].unsqueeze(2).to(x.dtype) * gathered
        out.index_add_(0, idx.reshape(-1), products.view(-1, d))
    return out


class _MaskedEncode(torch.autograd.Function):
    """``pre = x @ Aᵀ + bias`` with gradients for ``x``, ``w`` and ``bias``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, bias: Tensor, layout: MaskLayout) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.layout = layout
        return apply_a(x, w, layout, bias)

    @staticmethod
    def backward(
        ctx: Any, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, w = ctx.saved_tensors
        layout: MaskLayout = ctx.layout
        grad = grad.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        entries = sparse_entries(grad)
        if entries is not None:
            gx = sparse_apply_at(entries, w, layout, x.shape[0]) if need_x else None
            gw = sparse_sddmm(entries, x, layout) if need_w else None
            gb = grad.new_zeros(layout.d_sae).index_add_(0, entries.latent, entries.value)
        else:
            gx = apply_at(grad, w, layout) if need_x else None
            gw = sddmm(grad, x, layout) if need_w else None
            gb = grad.sum(dim=0)
        return gx, gw, gb if need_b else None, None


class _MaskedDecodeDense(torch.autograd.Function):
    """``x_hat = h @ A`` for dense codes, with gradients for ``h`` and ``w``."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, w: Tensor, layout: MaskLayout) -> Tensor:
        ctx.save_for_backward(h, w)
        ctx.layout = layout
        return apply_at(h, w, layout)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        h, w = ctx.saved_tensors
        layout: MaskLayout = ctx.layout
        grad = grad.contiguous()
        gh = apply_a(grad, w, layout) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            entries = sparse_entries(h)
            gw = (
                sparse_sddmm(entries, grad, layout)
                if entries is not None
                else sddmm(h, grad, layout)
            )
        return gh, gw, None


def masked_encode(x: Tensor, w: Tensor, bias: Tensor, layout: MaskLayout) -> Tensor:
    """``(batch, d_in) -> (batch, d_sae)``: ``x @ Aᵀ + bias`` in ``O(batch * d_sae * d)``."""
    return _MaskedEncode.apply(x.contiguous(), w, bias, layout)


def masked_decode_dense(h: Tensor, w: Tensor, layout: MaskLayout) -> Tensor:
    """``(batch, d_sae) -> (batch, d_in)``: ``h @ A`` for dense codes."""
    return _MaskedDecodeDense.apply(h.contiguous(), w, layout)


class _SelectedPreActivations(torch.autograd.Function):
    """``(x @ Aᵀ + bias).gather(1, indices)``, saving only inputs and ids (no ``k * d`` tensors)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, w: Tensor, bias: Tensor, indices: Tensor, layout: MaskLayout
    ) -> Tensor:
        ctx.save_for_backward(x, w, indices)
        ctx.layout = layout
        return gather_selected(x, w, indices, layout) + bias[indices]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w, indices = ctx.saved_tensors
        grads = selected_backward(ctx.needs_input_grad[:3], x, w, indices, grad, ctx.layout)
        return (*grads, None, None)


def selected_backward(
    needs: tuple[bool, ...], x: Tensor, w: Tensor, indices: Tensor, grad: Tensor, layout: MaskLayout
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``x``, ``w`` and ``bias`` for ``(x @ Aᵀ + bias).gather(1, indices)``.

    Args:
        needs: which of the three are wanted.
        grad: ``(batch, k)`` gradient of the selected values.

    Returns:
        ``(grad_x, grad_w, grad_bias)``, each None where not wanted; ``O(batch * k * d)``.
    """
    grad = grad.contiguous()
    gx = codes_decode(grad, indices, w, layout) if needs[0] else None
    gw = codes_value_grad(indices, grad, x, layout) if needs[1] else None
    gb = None
    if needs[2]:
        gb = grad.new_zeros(layout.d_sae).index_add_(0, indices.reshape(-1), grad.reshape(-1))
    return gx, gw, gb


class _MaskedDecodeSparse(torch.autograd.Function):
    """``x_hat = codes @ A`` for ``(batch, k)`` codes, saving only codes and ids."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, indices: Tensor, w: Tensor, layout: MaskLayout) -> Tensor:
        ctx.save_for_backward(values, indices, w)
        ctx.layout = layout
        return codes_decode(values, indices, w, layout)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        values, indices, w = ctx.saved_tensors
        need_v, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        gv, gw = decode_backward(values, indices, grad.contiguous(), w, ctx.layout, need_v, need_w)
        return gv, None, gw, None


def decode_backward(
    values: Tensor,
    indices: Tensor,
    g: Tensor,
    w: Tensor,
    layout: MaskLayout,
    need_values: bool,
    need_w: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of the codes' values and of ``w`` for :func:`masked_decode_sparse`.

    :func:`gather_selected` of ``g`` and :func:`codes_value_grad` by ``values`` in one pass: both
    read ``g`` at the same ``(batch, k, d)`` positions, gathered once per chunk.

    Returns:
        ``(batch, k)`` and ``(d_sae, d)`` gradients, each None where not wanted.
    """
    batch, k = indices.shape
    d = layout.rows.shape[1]
    gv = g.new_empty(batch, k) if need_values else None
    gw = w.new_zeros(w.shape) if need_w else None
    step = _code_step(k, d)
    for s in range(0, batch, step):
        idx = indices[s : s + step]
        rows = _take(layout.rows, idx)  # (chunk, k, d)
        gathered = g[s : s + step].gather(1, rows.flatten(1)).view(rows.shape)
        if gv is not None:
            gv[s : s + step] = (gathered * _take(w, idx)).sum(dim=-1)
        if gw is not None:
            products = values[s : s + step].unsqueeze(2).to(g.dtype) * gathered
            gw.index_add_(0, idx.reshape(-1), products.view(-1, d))
    return gv, gw


def selected_pre_activations(
    x: Tensor, w: Tensor, bias: Tensor, indices: Tensor, layout: MaskLayout
) -> Tensor:
    """``(batch, k)`` entries ``indices`` of ``x @ Aᵀ + bias``; forward and backward ``O(k d)``."""
    return _SelectedPreActivations.apply(x, w, bias, indices, layout)


def masked_decode_sparse(values: Tensor, indices: Tensor, w: Tensor, layout: MaskLayout) -> Tensor:
    """``(batch, k)`` codes -> ``(batch, d_in)``: scatter ``k * d`` products per row.

    Forward and backward are ``O(batch * k * d)``, independent of ``d_in`` and ``d_sae``, and the
    graph keeps only the codes, not the ``(batch, k, d)`` products.
    """
    return _MaskedDecodeSparse.apply(values.to(w.dtype), indices, w, layout)
