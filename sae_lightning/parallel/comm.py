"""The collectives of the sharded SAE, each counting the bytes it sends.

Every collective the sharded forward, backward and bookkeeping issue goes through this module,
so :class:`Traffic` can report the bytes one step communicates (per rank, payload only, by
operation and mesh dimension); docs/multi-gpu.md gives the formula the test checks against.
Two autograd functions carry the Megatron pattern: :class:`ReduceFromShards` sums partial
reconstructions (identity backward) and :class:`CopyToShards` feeds a replicated tensor to the
shards (its gradient is summed over them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

_active: list[Counter[str]] = []


@contextmanager
def traffic() -> Iterator[Counter[str]]:
    """Count the payload bytes of every collective issued inside, keyed ``"<dim>.<op>"``.

    ``all_reduce`` counts the reduced tensor, ``all_gather`` this rank's contribution.
    """
    counts: Counter[str] = Counter()
    _active.append(counts)
    try:
        yield counts
    finally:
        _active.remove(counts)


def _count(key: str, tensor: Tensor) -> None:
    for counts in _active:
        counts[key] += tensor.numel() * tensor.element_size()


def all_reduce(tensor: Tensor, group: dist.ProcessGroup, dim: str) -> Tensor:
    """Sum ``tensor`` in place over ``group`` (a no-op for a group of one); returns it."""
    if dist.get_world_size(group) > 1:
        _count(f"{dim}.all_reduce", tensor)
        dist.all_reduce(tensor, group=group)
    return tensor


def all_gather(tensor: Tensor, group: dist.ProcessGroup, dim: str) -> list[Tensor]:
    """Every rank's ``tensor`` (equal shapes), in group-rank order."""
    size = dist.get_world_size(group)
    if size == 1:
        return [tensor]
    _count(f"{dim}.all_gather", tensor)
    out = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out


class ReduceFromShards(torch.autograd.Function):
    """Forward: sum the shards' partial results. Backward: identity.

    The loss is computed identically on every tensor-parallel rank from the summed result, so
    each shard's gradient of its own partial sum is the gradient of the sum.
    """

    @staticmethod
    def forward(ctx: Any, partial: Tensor, group: dist.ProcessGroup) -> Tensor:
        return all_reduce(partial.clone(), group, "tp")

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class CopyToShards(torch.autograd.Function):
    """Forward: identity for a tensor every shard holds. Backward: sum the shards' gradients.

    Used for the decoder bias that centres the encoder's input: each shard's encoder rows
    contribute part of its gradient.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return all_reduce(grad.contiguous().clone(), ctx.group, "tp"), None
