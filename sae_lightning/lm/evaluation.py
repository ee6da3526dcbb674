"""Downstream evaluation: next-token loss with the SAE spliced in, against clean and ablated runs.

For each held-out context the LM runs three times: clean, with the activation at the hook
replaced by the SAE's reconstruction, and with it replaced by zeros. Positions the SAE never
trained on (special tokens) keep their clean activation in both patched runs. Sums are
returned rather than means, so ranks and chunks add up exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_lightning.lm.hooks import HookIO, model_lock, spliced

SUM_FIELDS = ("kl_sae", "kl_zero", "ce_clean", "ce_sae", "ce_zero", "tokens")
"""Order of the entries of :func:`spliced_loss_sums`' result."""


class SpliceMetrics(NamedTuple):
    """Per-token means of one evaluation (what the KL callback logs under ``e2e/``)."""

    kl: float
    """KL(clean || spliced) of the next-token distributions, nats per token."""
    ce_clean: float
    ce_sae: float
    ce_zero_ablation: float
    ce_recovered: float
    """(CE_zero - CE_sae) / (CE_zero - CE_clean): 1 is perfect, 0 is as bad as ablation."""
    kl_score: float
    """(KL_zero - KL_sae) / KL_zero, as SAELens' kl_div_score."""
    ce_increase: float
    """CE_sae - CE_clean, the e2e paper's metric."""


def memory_chunk(budget_bytes: float, context_length: int, vocab_size: int) -> int:
    """Contexts per forward pass so that about three logit tensors fit in ``budget_bytes``."""
    per_context = 3 * context_length * vocab_size * 4
    return max(1, int(budget_bytes // per_context))


def _log_probs(model: nn.Module, ids: Tensor) -> Tensor:
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return F.log_softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=-1)


@torch.no_grad()
def spliced_loss_sums(
    model: nn.Module,
    hook: str,
    io: HookIO,
    reconstruct: Callable[[Tensor], Tensor],
    input_ids: Tensor,
    keep: Tensor | None = None,
    chunk_size: int = 1,
) -> Tensor:
    """Summed losses over every predicted position of ``input_ids``, in :data:`SUM_FIELDS` order.

    Args:
        model: a causal LM returning ``.logits``.
        hook, io: where the SAE is spliced in.
        reconstruct: ``(..., d) -> (..., d)`` the SAE's reconstruction of raw activations.
        input_ids: ``(n, seq)`` held-out contexts.
        keep: ``(n, seq)`` bool, positions whose activation is replaced (default all).
        chunk_size: contexts per forward pass (bounds the memory of the logits).

    Returns:
        ``(6,)`` float64: KL(clean||sae), KL(clean||zero), CE clean, CE sae, CE zero, tokens.
    """
    device = next(model.parameters()).device
    sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float64)
    for start in range(0, len(input_ids), chunk_size):
        ids = input_ids[start : start + chunk_size].to(device)
        mask = None if keep is None else keep[start : start + chunk_size].to(device)

        def patch(fn: Callable[[Tensor], Tensor], mask: Tensor | None = mask) -> Callable:
            def replace(a: Tensor) -> Tensor:
                new = fn(a).to(a.dtype)
                return new if mask is None else torch.where(mask[..., None], new, a)

            return replace

        targets = ids[:, 1:, None]  # (b, seq - 1, 1)
        with model_lock(model):
            clean = _log_probs(model, ids)  # (b, seq - 1, vocab)
        sums[2] += -clean.gather(-1, targets).double().sum().cpu()
        p_clean = clean.exp()
        for kl_i, ce_i, fn in ((0, 3, reconstruct), (1, 4, torch.zeros_like)):
            with model_lock(model), spliced(model, hook, io, patch(fn)):
                patched = _log_probs(model, ids)
            sums[ce_i] += -patched.gather(-1, targets).double().sum().cpu()
            # Sum over the vocabulary in the logits' dtype, over positions in float64.
            sums[kl_i] += (p_clean * (clean - patched)).sum(-1).double().sum().cpu()
            del patched
        sums[5] += targets.numel()
    return sums


def splice_metrics(sums: Tensor) -> SpliceMetrics:
    """Per-token metrics from (rank- and chunk-summed) :func:`spliced_loss_sums` results."""
    kl_sae, kl_zero, ce_clean, ce_sae, ce_zero, tokens = (float(v) for v in sums)
    n = max(tokens, 1.0)
    kl, klz, cc, cs, cz = kl_sae / n, kl_zero / n, ce_clean / n, ce_sae / n, ce_zero / n
    recovered = (cz - cs) / (cz - cc) if cz != cc else float("nan")
    score = (klz - kl) / klz if klz != 0 else float("nan")
    return SpliceMetrics(kl, cc, cs, cz, recovered, score, cs - cc)
