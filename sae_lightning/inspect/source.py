"""Where the activations come from: the LM run over text, or the activation cache.

Both yield :class:`Chunk` s of whole contexts: token ids, the activations at the hook and which
positions are scored, so the browser can show a window of tokens around every maximum.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Chunk:
    """A few contexts and their activations at one hook."""

    ids: Tensor
    """``(B, L)`` int64 token ids."""
    acts: Tensor
    """``(B, L, d_in)`` activations (rows of unscored positions are ignored)."""
    keep: Tensor
    """``(B, L)`` bool: positions that count (BOS, EOS and padding do not)."""
    first: int
    """Index of the chunk's first context in the whole stream."""


def take_tokens(ids: Tensor, keep: Tensor, tokens: int) -> tuple[Tensor, Tensor]:
    """The first contexts of ``(ids, keep)`` holding at least ``tokens`` scored positions."""
    counts = keep.sum(dim=1).cumsum(0)
    n = int(torch.searchsorted(counts, torch.tensor(tokens))) + 1
    return ids[:n], keep[:n]


class LMSource:
    """Runs the LM over packed contexts, ``batch_size`` at a time, up to the hook only.

    Args:
        model: the causal LM (eval mode).
        hook: the module path to read.
        io: ``output`` or ``input`` of that module.
        ids: ``(n, L)`` token ids of the contexts.
        keep: ``(n, L)`` scored positions.
        batch_size: contexts per forward pass.
    """

    def __init__(
        self, model: nn.Module, hook: str, io: Any, ids: Tensor, keep: Tensor, batch_size: int
    ) -> None:
        self.model, self.hook, self.io = model, hook, io
        self.ids, self.keep = ids, keep
        self.batch_size = batch_size

    @property
    def tokens(self) -> int:
        return int(self.keep.sum())

    def __len__(self) -> int:
        return -(-len(self.ids) // self.batch_size)

    @torch.no_grad()
    def __iter__(self) -> Iterator[Chunk]:
        from sae_lightning.lm.hooks import run_to_hooks

        device = next(self.model.parameters()).device
        for start in range(0, len(self.ids), self.batch_size):
            ids = self.ids[start : start + self.batch_size]
            acts = run_to_hooks(self.model, ids.to(device), [self.hook], self.io)[self.hook]
            yield Chunk(ids, acts, self.keep[start : start + self.batch_size], start)


class CacheSource:
    """Reads the training shards of an activation cache in their stored order.

    The cache keeps the token id of every scored position but not where contexts start, so
    the stream of scored tokens is cut into pseudo-contexts of ``context_length`` tokens; a
    window around a maximum may then span the end of one packed context and the next.

    Args:
        path: the cache folder (a complete one: its manifest is read).
        hook_index: which of the cache's hooks (rows repeat once per hook and token).
        tokens: stop after this many tokens.
        context_length: tokens per pseudo-context.
        batch_size: pseudo-contexts per chunk.
    """

    def __init__(
        self, path: Path, hook_index: int, tokens: int, context_length: int, batch_size: int
    ) -> None:
        from sae_lightning.data.cache_format import read_manifest

        self.path = path
        self.manifest = read_manifest(path, "data.cache_dir")
        self.hooks = len(self.manifest["hooks"])
        self.hook_index = hook_index
        self.tokens = min(tokens, int(self.manifest["tokens"]))
        self.context_length = context_length
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-self.tokens // (self.context_length * self.batch_size))

    def _stream(self) -> Iterator[tuple[Tensor, Tensor]]:
        """``(token ids, activations)`` of each shard, this hook's rows only."""
        from sae_lightning.data.cache_format import load_tensor, map_tensor

        for shard in self.manifest["shards"]:
            if shard["split"] != "train":
                continue
            file = self.path / shard["file"]
            acts = map_tensor(file, "activations")
            acts = acts.reshape(-1, self.hooks, acts.shape[-1])[:, self.hook_index]
            yield load_tensor(file, "token_ids").long(), acts

    def __iter__(self) -> Iterator[Chunk]:
        step = self.context_length * self.batch_size
        ids_buf: list[Tensor] = []
        acts_buf: list[Tensor] = []
        held, sent, first = 0, 0, 0
        for ids, acts in self._stream():
            ids_buf.append(ids)
            acts_buf.append(acts)
            held += len(ids)
            while held >= step or (held and sent + held >= self.tokens):
                take = min(step, held, self.tokens - sent)
                ids_all, acts_all = torch.cat(ids_buf), torch.cat(acts_buf)
                yield self._chunk(ids_all[:take], acts_all[:take], first)
                ids_buf, acts_buf = [ids_all[take:]], [acts_all[take:]]
                held -= take
                sent += take
                first += -(-take // self.context_length)
                if sent >= self.tokens:
                    return

    def _chunk(self, ids: Tensor, acts: Tensor, first: int) -> Chunk:
        length = self.context_length
        b = -(-len(ids) // length)
        pad = b * length - len(ids)
        keep = torch.ones(b * length, dtype=torch.bool)
        if pad:
            keep[len(ids) :] = False
            ids = torch.cat([ids, ids.new_zeros(pad)])
            acts = torch.cat([acts, acts.new_zeros(pad, acts.shape[-1])])
        return Chunk(
            ids.reshape(b, length), acts.reshape(b, length, -1), keep.reshape(b, length), first
        )
