"""The sparse weight gradient ``G.T @ x`` of a ``(batch, k)`` selection, without dense products.

Shared by the encoder's backward (:mod:`sae_lightning.kernels.encode`) and the decoder's
(:mod:`sae_lightning.kernels.decode`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_lightning.kernels.memory import GRADIENTS


def sparse_weight_grad(indices: Tensor, weights: Tensor, x: Tensor, num_rows: int) -> Tensor:
    """``(num_rows, d)`` with row ``i`` = sum over ``(b, j)`` where ``indices[b, j] == i`` of
    ``weights[b, j] * x[b]``; ``indices``/``weights`` are ``(batch, k)``, ``x`` ``(batch, d)``.

    This is ``G.T @ x`` for the ``(batch, num_rows)`` matrix ``G`` holding ``weights`` at
    ``indices``, computed from the pairs sorted by row, so that each touched row is accumulated
    once and no ``(batch, k, d)`` products exist. On CPU the pairs become a CSR matrix multiplied
    into a gradient buffer recycled from the previous step (``memory.GRADIENTS``); elsewhere
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
    out = GRADIENTS.take((num_rows, x.shape[1]), x)
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
