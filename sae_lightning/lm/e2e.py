"""End-to-end SAE losses (Braun et al. 2024, papers.md section 3): train through the frozen LM.

``L_e2e = KL(P_clean || P_spliced) + sparsity``: the SAE's reconstruction replaces the
activation at the hook and the LM's later layers run on it, with gradients flowing through them
into the SAE (the LM's own parameters stay frozen). ``L_e2e+ds`` adds the mean squared error
between the spliced and clean activations at later hooks (``downstream``). The KL direction and
reductions follow the reference code (``e2e_sae/losses.py``): ``F.kl_div(log_softmax(new),
log_softmax(orig), log_target=True, reduction="batchmean")`` over flattened positions, which is
KL(P_orig || P_sae) per token; the downstream terms are elementwise means, averaged over hooks.
The sparsity term needs the SAE's codes, so it stays with the caller (the training module).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_lightning.lm.hooks import HookIO, captured, first_tensor, model_lock


class E2ELoss(NamedTuple):
    """The differentiable terms of one e2e step."""

    kl: Tensor
    """KL(P_clean || P_spliced) per predicted token (scalar)."""
    downstream: Tensor
    """Mean over ``downstream`` hooks of the elementwise MSE between spliced and clean
    activations (scalar; zero without downstream hooks)."""
    clean_logits: Tensor
    """``(batch, seq, vocab)`` logits of the clean run (no grad)."""


def e2e_loss(
    model: nn.Module,
    hook: str,
    io: HookIO,
    reconstruct: Callable[[Tensor], Tensor],
    input_ids: Tensor,
    downstream: Sequence[str] = (),
) -> E2ELoss:
    """KL and downstream terms of splicing ``reconstruct`` into ``model`` at ``hook``.

    Args:
        model: a frozen causal LM (parameters with ``requires_grad=False``).
        hook, io: where the SAE's reconstruction replaces the activation.
        reconstruct: ``(batch, seq, d) -> (batch, seq, d)``, differentiable in the SAE's
            parameters (e.g. a closure that also keeps the SAE's codes for the sparsity term).
        input_ids: ``(batch, seq)`` token ids.
        downstream: later module paths whose ``io`` activations should match the clean run.

    Returns:
        The loss terms; back-propagating ``kl`` (plus weighted ``downstream``) reaches the SAE
        through every layer after ``hook``.
    """
    from sae_lightning.lm.hooks import spliced

    with (
        model_lock(model),
        torch.no_grad(),
        captured(model, list(downstream), io, stop=False) as clean_acts,
    ):
        clean = model(input_ids=input_ids, use_cache=False).logits
    clean_acts = dict(clean_acts)
    with (
        model_lock(model),
        spliced(model, hook, io, reconstruct),
        captured(model, list(downstream), io, stop=False) as new_acts,
    ):
        new = model(input_ids=input_ids, use_cache=False).logits
    vocab = new.shape[-1]
    kl = F.kl_div(
        F.log_softmax(new.reshape(-1, vocab), dim=-1),
        F.log_softmax(clean.reshape(-1, vocab), dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    if downstream:
        terms = [F.mse_loss(first_tensor(new_acts[h]), clean_acts[h]) for h in downstream]
        ds = torch.stack(terms).mean()
    else:
        ds = kl.new_zeros(())
    return E2ELoss(kl, ds, clean)
