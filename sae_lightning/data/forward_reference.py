"""The LM's forward pass to the deepest hook alone: the yardstick of ``sae-lightning cache``.

The harvest's throughput is only meaningful against what the LM alone does on the same
machine at the same time. Timing the reference after a harvest of many minutes compares two
different moments of a shared machine, so half of the reference batches run before the
harvest and half after, and one untimed batch first warms the model up for both.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from sae_lightning.lm.hooks import run_to_hooks

if TYPE_CHECKING:
    from sae_lightning.lm.harvest import Harvester
    from sae_lightning.lm.text import Contexts


class ForwardReference:
    """Times ``run_to_hooks`` on the first contexts of ``contexts``, in two halves.

    Args:
        harvester: the harvest's model, hooks and batch size.
        contexts: the training contexts (the reference reads the first ones).
        harvesting: contexts the harvest will run; the reference takes a tenth of them, at
            least 4 and at most 16 LM batches (it delays the harvest's first progress line).
    """

    def __init__(self, harvester: Harvester, contexts: Contexts, harvesting: int) -> None:
        self.harvester = harvester
        self.ids = contexts.ids
        size = harvester.batch_size
        n = min(len(contexts), max(4 * size, min(harvesting // 10, 16 * size)))
        self.contexts = n
        self.batches = [(first, min(first + size, n)) for first in range(0, n, size)]
        self.seconds = 0.0
        self.tokens = 0
        self._warm = False

    def _forward(self, first: int, end: int) -> None:
        h = self.harvester
        with torch.no_grad():
            run_to_hooks(h.model, self.ids[first:end].to(h.device), h.hooks, h.io)

    def run_half(self, half: int) -> None:
        """Time batches ``half``, ``half + 2``, ... (0 before the harvest, 1 after it)."""
        if not self.batches:
            return
        if not self._warm:
            self._forward(*self.batches[0])
            self._warm = True
        for first, end in self.batches[half::2]:
            start = time.perf_counter()
            self._forward(first, end)
            self.seconds += time.perf_counter() - start
            self.tokens += int(self.ids[first:end].numel())

    def tokens_per_second(self) -> float:
        """Forward-pass tokens per second over both halves."""
        return self.tokens / max(self.seconds, 1e-9)
