"""The streaming orders of ``lm_activations``: batch ``t`` is a pure function of ``(seed, t)``.

:class:`MixingStream` (activations): the infinite stream visits the training contexts in a new
seeded order each epoch and is cut into mixing buffers of ``buffer_size`` rows; each buffer is
harvested (the next one in a background thread while the SAE trains), shuffled at token level
and sliced into batches. Which contexts a buffer holds follows from the token ids alone, so a
run resumed at step ``t`` recomputes its buffer and sees exactly the batches an unbroken run
would, and DDP ranks take their slices of one global batch.

:class:`TokenStream` (e2e training): global batches of whole contexts in the same seeded
per-epoch order, so a local run and an e2e run over the same number of tokens see the same
contexts.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from sae_lightning.data.stream import seeded_generator
from sae_lightning.errors import ConfigError
from sae_lightning.lm.text import Contexts

if TYPE_CHECKING:
    from sae_lightning.lm.harvest import Harvester

_ORDER, _BUFFER = 10, 11  # stream ids for seeded_generator


class TokenBatch(NamedTuple):
    """Whole contexts for e2e training (this rank's part of one global batch)."""

    ids: Tensor
    """``(contexts, context_length)`` int64 token ids."""
    keep: Tensor
    """``(contexts, context_length)`` bool: positions the SAE replaces (others stay clean)."""


class TokenStream:
    """Global batches of whole contexts: batch ``t`` depends only on ``(seed, t)``.

    Stream position ``p`` is context ``order_e[p mod n]`` of epoch ``e = p // n``, with the same
    seeded per-epoch orders as :class:`MixingStream`.

    Args:
        contexts: the training contexts.
        batch_size: contexts per global batch.
        seed: data seed.
    """

    def __init__(self, contexts: Contexts, batch_size: int, seed: int) -> None:
        if len(contexts) == 0:
            raise ConfigError("data.text", "the corpus packs into no training context")
        self.contexts = contexts
        self.batch_size = batch_size
        self.seed = seed
        self._orders: dict[int, Tensor] = {}

    def _order(self, epoch: int) -> Tensor:
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
            g = seeded_generator(self.seed, _ORDER, epoch)
            self._orders[epoch] = torch.randperm(len(self.contexts), generator=g)
        return self._orders[epoch]

    def rows(self, t: int) -> Tensor:
        """``(batch_size,)`` context indices of global batch ``t``."""
        n = len(self.contexts)
        positions = torch.arange(t * self.batch_size, (t + 1) * self.batch_size)
        epochs, offsets = positions // n, positions % n
        return torch.stack(
            [self._order(int(e))[int(o)] for e, o in zip(epochs, offsets, strict=True)]
        )

    def batch(self, t: int) -> TokenBatch:
        rows = self.rows(t)
        return TokenBatch(self.contexts.ids[rows], self.contexts.keep[rows])


class MixingStream:
    """The streaming mode's batches: buffers of harvested rows, shuffled, cut into batches.

    Args:
        contexts: the training contexts.
        harvest: ``rows -> (kept rows x hooks, d)`` activations of those contexts, in order.
        rows_per_position: hooks per kept position.
        buffer_size: rows per mixing buffer (a multiple of ``batch_size``).
        batch_size: rows per global batch.
        seed: data seed.
        prefetch: compute buffer ``j + 1`` in a background thread.
    """

    def __init__(
        self,
        contexts: Contexts,
        harvest: Callable[[Tensor], Tensor],
        rows_per_position: int,
        buffer_size: int,
        batch_size: int,
        seed: int,
        prefetch: bool = True,
    ) -> None:
        self.harvest = harvest
        self.counts = contexts.row_counts() * rows_per_position  # (n,) rows per context
        self.per_epoch = int(self.counts.sum())
        if self.per_epoch == 0:
            raise ConfigError("data.text", "no token survives the exclusions")
        self.buffer_size = buffer_size
        self.batch_size = batch_size
        self.seed = seed
        self._orders: dict[int, tuple[Tensor, Tensor]] = {}
        self._orders_lock = threading.Lock()  # the prefetch thread computes orders too
        self._buffers: dict[int, Tensor] = {}
        self._pending: dict[int, concurrent.futures.Future[Tensor]] = {}
        self.prefetch = prefetch
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _order(self, epoch: int) -> tuple[Tensor, Tensor]:
        """``(context order, cumulative row counts in that order)`` of ``epoch``."""
        with self._orders_lock:
            if epoch not in self._orders:
                if len(self._orders) > 2:
                    self._orders.pop(min(self._orders))
                g = seeded_generator(self.seed, _ORDER, epoch)
                order = torch.randperm(len(self.counts), generator=g)
                self._orders[epoch] = (order, self.counts[order].cumsum(0))
            return self._orders[epoch]

    def buffer(self, j: int) -> Tensor:
        """Mixing buffer ``j``: stream rows ``[j W, (j + 1) W)``, shuffled, ``(W, d)``.

        Stream position ``p`` is row ``p mod T`` of epoch ``p // T`` (``T`` rows per epoch), the
        epoch visiting contexts in its own seeded order.
        """
        pieces = []
        position, stop = j * self.buffer_size, (j + 1) * self.buffer_size
        while position < stop:
            epoch, offset = divmod(position, self.per_epoch)
            end = min(self.per_epoch, offset + stop - position)
            order, cum = self._order(epoch)
            first = int(torch.searchsorted(cum, offset, right=True))
            last = int(torch.searchsorted(cum, end - 1, right=True))
            base = int(cum[first] - self.counts[order[first]])
            rows = self.harvest(order[first : last + 1])[offset - base : end - base]
            # Shuffle each epoch's part on its own, so stream positions [e T, (e + 1) T) hold
            # exactly epoch e's rows even when a buffer straddles two epochs.
            g = seeded_generator(self.seed, _BUFFER, j, len(pieces))
            pieces.append(rows[torch.randperm(len(rows), generator=g)])
            position += end - offset
        return torch.cat(pieces)

    def _get(self, j: int) -> Tensor:
        if j not in self._buffers:
            future = self._pending.pop(j, None)
            self._buffers[j] = future.result() if future is not None else self.buffer(j)
            for old in [k for k in self._buffers if k < j]:
                del self._buffers[old]
            if self.prefetch and j + 1 not in self._pending:
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(1, "harvest")
                self._pending[j + 1] = self._pool.submit(self._harvest_in_thread, j + 1)
        return self._buffers[j]

    def _harvest_in_thread(self, j: int) -> Tensor:
        with torch.no_grad():
            return self.buffer(j)

    def batch(self, t: int) -> Tensor:
        """Global batch ``t``: identical for the same seed and ``t``, whatever ran before."""
        per_buffer = self.buffer_size // self.batch_size
        j, i = divmod(t, per_buffer)
        return self._get(j)[i * self.batch_size : (i + 1) * self.batch_size]

    def close(self) -> None:
        """Stop the prefetch thread (a later batch starts a new one)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()
        self._buffers.clear()


def first_rows(contexts: Contexts, harvester: Harvester, n: int) -> Tensor:
    """The first ``n`` activation rows of ``contexts`` in their canonical order."""
    counts = contexts.row_counts() * len(harvester.hooks)
    needed = int(torch.searchsorted(counts.cumsum(0), n)) + 1
    return harvester(contexts, torch.arange(min(needed, len(contexts))))[:n]
