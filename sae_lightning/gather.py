"""Gathering a tensor from every DDP rank with torch's current (non-deprecated) collective.

Lightning's ``all_gather`` goes through ``torch.distributed.nn.functional.all_gather``, which
torch deprecates and warns about at every call; callbacks that gather every step use this.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def gather_ranks(x: Tensor) -> Tensor:
    """``(world, *x.shape)``: every rank's ``x`` (same shape on every rank), without autograd.

    Outside a process group it is ``x[None]``. Above one rank it is a collective: every rank
    must call it.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x.unsqueeze(0)
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.stack(out)
