"""The sparse weight gradient ``G.T @ x`` of a sparse selection, without dense products.

Shared by the encoder's backward (:mod:`sae_lightning.kernels.encode`) and the decoder's
(:mod:`sae_lightning.kernels.decode`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from sae_lightning.kernels.memory import GRADIENTS


def sparse_weight_grad(
    indices: Tensor, weights: Tensor, x: Tensor, num_rows: int, *, rows: Tensor | None = None
) -> Tensor:
    """``(num_rows, d)`` with row ``i`` = sum over ``(b, j)`` where ``indices[b, j] == i`` of
    ``weights[b, j] * x[b]``; ``indices``/``weights`` are ``(batch, k)``, ``x`` ``(batch, d)``.
    With ``rows``, the pairs are a flat list instead: entry ``e`` is ``weights[e]`` at
    ``indices[e]`` in row ``rows[e]`` of ``x`` (any order).

    This is ``G.T @ x`` for the ``(batch, num_rows)`` matrix ``G`` holding ``weights`` at
    ``indices``, computed from the pairs sorted by row, so that each touched row is accumulated
    once and no ``(batch, k, d)`` products exist. On CPU the pairs become a CSR matrix multiplied
    into a gradient buffer recycled from the previous step (``memory.GRADIENTS``); elsewhere
    ATen's embedding-bag weight gradient does the same into fresh memory. Falls back to
    an ``index_add`` of the weighted rows if the private ATen entry point is unavailable.
    """
    if rows is None:  # (batch, k): entry e of the flattened pairs is in row e // k
        k = indices.shape[1]
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(k)
    indices, weights = indices.reshape(-1), weights.reshape(-1)
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return _weight_grad_csr(indices, weights, x, num_rows, rows)
    if _DENSE_BACKWARD is not None:
        return _weight_grad_dense_backward(indices, weights, x, num_rows, rows)
    return _weight_grad_by_index_add(indices, weights, x, num_rows, rows)


def _weight_grad_csr(
    indices: Tensor, weights: Tensor, x: Tensor, num_rows: int, rows: Tensor
) -> Tensor:
    latents, order = indices.sort(stable=True)  # pairs grouped by latent
    crow = torch.zeros(num_rows + 1, dtype=torch.long, device=x.device)
    torch.cumsum(torch.bincount(latents, minlength=num_rows), 0, out=crow[1:])
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        g = torch.sparse_csr_tensor(
            crow, rows[order], weights[order], (num_rows, x.shape[0]), check_invariants=False
        )
    out = GRADIENTS.take((num_rows, x.shape[1]), x)
    torch.addmm(out, g, x, beta=0, out=out)
    return out.detach()  # a new handle: autograd may keep it as .grad without copying


def _weight_grad_dense_backward(
    indices: Tensor, weights: Tensor, x: Tensor, num_rows: int, rows: Tensor
) -> Tensor:
    bag_size = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    bag_size.index_add_(0, rows, torch.ones_like(rows))
    max_indices = torch.empty(0, dtype=torch.long, device=x.device)  # unused by mode "sum"
    assert _DENSE_BACKWARD is not None
    return _DENSE_BACKWARD(
        x.contiguous(),
        indices,
        rows,  # offset2bag
        bag_size,
        max_indices,
        num_rows,
        False,  # scale_grad_by_freq
        0,  # mode "sum"
        weights,
        -1,  # padding_idx: none
    )


def _weight_grad_by_index_add(
    indices: Tensor, weights: Tensor, x: Tensor, num_rows: int, rows: Tensor
) -> Tensor:
    grad = torch.zeros(num_rows, x.shape[1], dtype=x.dtype, device=x.device)
    return grad.index_add_(0, indices, weights.unsqueeze(1).to(x.dtype) * x[rows])


def _find_dense_backward() -> Callable[..., Tensor] | None:
    try:
        return torch.ops.aten._embedding_bag_dense_backward  # type: ignore[no-any-return]
    except (AttributeError, RuntimeError):  # pragma: no cover - depends on the torch build
        return None


_DENSE_BACKWARD = _find_dense_backward()
