"""Run the LM over packed contexts and collect the kept activations at the hook points."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sae_lightning.lm.hooks import HookIO, run_to_hooks
from sae_lightning.lm.text import Contexts


class Harvester:
    """Activations of whole contexts, flattened to rows in a fixed order.

    Row order: context by context, position by position, and for each kept position one row per
    hook (in the order of ``hooks``). The model runs ``batch_size`` contexts at a time and
    stops after the deepest hook.

    Args:
        model: the causal LM (frozen, eval mode).
        hooks: resolved module paths.
        io: ``output`` or ``input`` of each module.
        dtype: dtype the rows are returned in (the cache's storage dtype).
        batch_size: contexts per forward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        hooks: Sequence[str],
        io: HookIO,
        dtype: torch.dtype,
        batch_size: int,
    ) -> None:
        self.model = model
        self.hooks = list(hooks)
        self.io: HookIO = io
        self.dtype = dtype
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, contexts: Contexts, rows: Tensor | None = None) -> Tensor:
        """``(kept positions x hooks, d)`` activations of ``contexts`` (or its ``rows``), on CPU."""
        ids = contexts.ids if rows is None else contexts.ids[rows]
        keep = contexts.keep if rows is None else contexts.keep[rows]
        out = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size].to(self.device)
            acts = run_to_hooks(self.model, chunk, self.hooks, self.io)
            stacked = torch.stack([acts[h] for h in self.hooks], dim=2)  # (b, seq, hooks, d)
            kept = stacked[keep[start : start + self.batch_size].to(stacked.device)]
            out.append(kept.reshape(-1, stacked.shape[-1]).to("cpu", self.dtype))
        if not out:
            return torch.zeros(0, 0, dtype=self.dtype)
        return torch.cat(out)
