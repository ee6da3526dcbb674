"""Sparse decoding: the sum of ``k`` weighted atoms per row, with a sparse backward."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_lightning.kernels import memory
from sae_lightning.kernels.weight_grad import sparse_weight_grad


class SparseDecode(torch.autograd.Function):
    """``out[b] = sum_j values[b, j] * atoms[indices[b, j]]``, as ``F.embedding_bag``.

    ``forward(indices, values, atoms) -> (batch, d_in)``. The backward computes the same
    gradients as ``embedding_bag``'s, but also in bfloat16 on CUDA, where ATen has no kernel for
    the gradient of ``per_sample_weights``: there ``grad_values[b, j] = grad[b] . atoms[idx]``
    is a batched matrix-vector product over gathered atoms, in chunks of at most
    :data:`~sae_lightning.kernels.memory.DEFAULT_CHUNK_BYTES`.
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
    per_row = max(
        1, memory.DEFAULT_CHUNK_BYTES // max(1, k * atoms.shape[1] * atoms.element_size())
    )
    out = []
    for i in range(0, batch, per_row):
        gathered = atoms[indices[i : i + per_row]]  # (rows, k, d)
        out.append(torch.bmm(gathered, rows[i : i + per_row].unsqueeze(2)).squeeze(2))
    return torch.cat(out)
