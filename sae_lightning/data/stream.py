"""A resumable stream of batches whose content is a pure function of the batch index.

Because batch ``t`` is always the same tensor, a run resumed at step ``t`` sees exactly the data
an uninterrupted run would have seen, and each DDP rank takes its own slice of the same global
batch, so ``world_size`` processes train on what one process would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import IterableDataset

BatchFn = Callable[[int], Tensor]
"""``make_batch(t) -> (global_batch, d_in)``: deterministic in ``t``."""


class IndexedBatchStream(IterableDataset):
    """Yields ``make_batch(start), make_batch(start + 1), ...``, this rank's slice of each.

    Args:
        make_batch: deterministic batch factory.
        start: index of the first batch to yield (the number already consumed).
        rank, world_size: which contiguous slice of each global batch this process takes.
        length: number of batches in total (None: endless).
    """

    def __init__(
        self,
        make_batch: BatchFn,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        length: int | None = None,
    ) -> None:
        super().__init__()
        self.make_batch = make_batch
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self.length = length

    def __iter__(self) -> Iterator[Tensor]:
        t = self.start
        while self.length is None or t < self.length:
            batch = self.make_batch(t)
            per_rank = batch.shape[0] // self.world_size
            yield batch[self.rank * per_rank : (self.rank + 1) * per_rank]
            t += 1


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer keys (e.g. ``(seed, stream_id, batch_index)``)."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (k + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return torch.Generator().manual_seed(h & 0x7FFFFFFFFFFFFFFF)


class ConsumedBatches:
    """Counts training batches as they reach the model, for the DataModule's checkpoint state."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict[str, Any]:
        return {"batches_consumed": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state.get("batches_consumed", 0))
