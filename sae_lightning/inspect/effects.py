"""What a latent writes: its logit effects through the LM's head, and its nearest atoms.

The logit effect of atom ``d`` is ``W_U (norm(d) - norm(0))``: the decoder row through the
final norm (``norm(0)`` removes a LayerNorm's bias, which is the same for every atom) and the
unembedding, the direct path from a residual-stream write to the next-token logits. Both are
computed for blocks of latents, so the ``(latents, vocab)`` matrix is never held at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLOCK = 256
"""Latents per block of the ``(block, vocab)`` and ``(block, latents)`` products."""


@dataclass
class Effects:
    """``(latents, n)`` ids and values of the top positive and negative logit effects."""

    up_ids: Tensor
    up_values: Tensor
    down_ids: Tensor
    down_values: Tensor


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the residual stream before the unembedding.

    It is the last direct child of the transformer body (``model.base_model``) that is a norm
    layer: ``ln_f`` of GPT-2, ``norm`` of Llama-family models. Identity when there is none.
    """
    norms = [m for _, m in model.base_model.named_children() if "norm" in type(m).__name__.lower()]
    return norms[-1] if norms else nn.Identity()


@torch.no_grad()
def logit_effects(model: nn.Module, atoms: Tensor, n: int) -> Effects:
    """Top-``n`` promoted and suppressed tokens of each atom (rows of ``atoms``)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings")
    norm = final_norm(model)
    weight = head.weight
    parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    zero = norm(torch.zeros(1, atoms.shape[1], device=weight.device, dtype=weight.dtype))
    for start in range(0, atoms.shape[0], BLOCK):
        block = atoms[start : start + BLOCK].to(weight.device, weight.dtype)
        logits = (norm(block) - zero) @ weight.T  # (block, vocab)
        up, down = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        parts.append((up.indices, up.values, down.indices, down.values))
    cat = [torch.cat([p[i] for p in parts]).cpu() for i in range(4)]
    return Effects(cat[0], cat[1].float(), cat[2], cat[3].float())


@torch.no_grad()
def nearest_atoms(atoms: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``(ids, cosines)``, each ``(latents, n)``: every atom's most similar other atoms."""
    unit = F.normalize(atoms.float(), dim=1)
    n = min(n, unit.shape[0] - 1)
    ids, values = [], []
    for start in range(0, unit.shape[0], BLOCK):
        cos = unit[start : start + BLOCK] @ unit.T  # (block, latents)
        rows = torch.arange(start, start + cos.shape[0], device=cos.device)
        cos[torch.arange(cos.shape[0], device=cos.device), rows] = -torch.inf
        top = cos.topk(n, dim=1)
        ids.append(top.indices.cpu())
        values.append(top.values.cpu())
    return torch.cat(ids), torch.cat(values)
