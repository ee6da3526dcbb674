"""Sparse decoding: the sum of a row's weighted atoms, with a sparse backward.

Codes come as ``(batch, k)`` ids and weights, or as one flat row-major list with the first
entry of each row (``offsets``, as ``F.embedding_bag`` takes them), for rows of varying length.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_lightning.kernels import memory
from sae_lightning.kernels.select import offsets_of, rows_of
from sae_lightning.kernels.weight_grad import sparse_weight_grad


class SparseDecode(torch.autograd.Function):
    """``out[b] = sum_j values[b, j] * atoms[indices[b, j]]``, as ``F.embedding_bag``.

    ``forward(indices, values, atoms, offsets) -> (batch, d_in)``; ``offsets`` is None for
    ``(batch, k)`` codes, or ``(batch,)`` row starts of flat ones. The backward computes the same
    gradients as ``embedding_bag``'s, but also in bfloat16 on CUDA, where ATen has no kernel for
    the gradient of ``per_sample_weights``: there ``grad_values[b, j] = grad[b] . atoms[idx]``
    is a batched matrix-vector product over gathered atoms, in chunks of at most
    :data:`~sae_lightning.kernels.memory.DEFAULT_CHUNK_BYTES`.
    """

    @staticmethod
    def forward(
        ctx: Any, indices: Tensor, values: Tensor, atoms: Tensor, offsets: Tensor | None
    ) -> Tensor:
        values = values.to(atoms.dtype)
        ctx.save_for_backward(indices, values, atoms, offsets)
        return F.embedding_bag(indices, atoms, offsets, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        indices, values, atoms, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        rows = None if offsets is None else rows_of(offsets, indices.numel())
        grad_values = grad_atoms = None
        if ctx.needs_input_grad[1]:
            grad_values = sampled_dots(grad, atoms, indices, rows)
        if ctx.needs_input_grad[2]:
            grad_atoms = sparse_weight_grad(indices, values, grad, atoms.shape[0], rows=rows)
        return None, grad_values, grad_atoms, None


def sparse_decode(
    indices: Tensor, values: Tensor, atoms: Tensor, offsets: Tensor | None = None
) -> Tensor:
    """Ids and weights -> ``(batch, d_in)``: each row's sum of weighted atoms.

    ``indices``/``values`` are ``(batch, k)``, or flat row-major lists whose row ``b`` starts at
    ``offsets[b]``.
    """
    return SparseDecode.apply(indices, values, atoms, offsets)


def sampled_dots(
    grad: Tensor, atoms: Tensor, indices: Tensor, rows: Tensor | None = None
) -> Tensor:
    """Entry ``[b, j] = grad[b] . atoms[indices[b, j]]`` for ``(batch, k)`` ``indices``; with
    ``rows`` (a flat list, non-decreasing rows), entry ``e = grad[rows[e]] . atoms[indices[e]]``.

    Args:
        grad: ``(batch, d)``; atoms: ``(n, d)``; indices: ids into ``atoms``.
    """
    flat, batch = indices.reshape(-1), grad.shape[0]
    bags = torch.arange(batch, device=grad.device)
    if rows is None:
        k = indices.shape[1]
        rows, offsets = bags.repeat_interleave(k), bags * k
    else:
        offsets = offsets_of(rows, batch)
    if grad.device.type != "cuda":
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(
            grad, atoms, flat, offsets, rows, 0, -1
        ).view(indices.shape)
    return _sampled_dots_gathered(grad, atoms, flat, rows).view(indices.shape)


def _sampled_dots_gathered(grad: Tensor, atoms: Tensor, indices: Tensor, rows: Tensor) -> Tensor:
    """:func:`sampled_dots` of flat entries as dot products of gathered rows, chunked."""
    per_chunk = max(1, memory.DEFAULT_CHUNK_BYTES // max(1, atoms.shape[1] * atoms.element_size()))
    out = []
    for i in range(0, indices.numel(), per_chunk):
        gathered = atoms[indices[i : i + per_chunk]]  # (chunk, d)
        out.append((gathered * grad[rows[i : i + per_chunk]]).sum(dim=1))
    return torch.cat(out) if out else grad.new_zeros(0)
