"""Metrics that must agree across ranks, as torchmetrics states that Lightning synchronises."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class FractionOfVarianceUnexplained(Metric):
    """FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, pooled over every batch seen.

    The mean is the pooled mean of all inputs, so the value does not depend on how the data
    was split into batches or ranks. States are float64 sums.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, d_in: int) -> None:
        super().__init__()
        self.add_state("sq_err", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(d_in, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_sq", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        x64 = x.detach().double()
        self.sq_err += (x64 - x_hat.detach().double()).pow(2).sum()
        self.sum_x += x64.sum(dim=0)
        self.sum_sq += x64.pow(2).sum()
        self.n += x64.shape[0]

    def compute(self) -> Tensor:
        total_var = self.sum_sq - self.sum_x.pow(2).sum() / self.n.clamp_min(1)
        return (self.sq_err / total_var.clamp_min(1e-30)).float()


class FeatureDensity(Metric):
    """Per-latent firing frequency (fraction of tokens where it is nonzero)."""

    full_state_update = False

    def __init__(self, d_sae: int) -> None:
        super().__init__()
        self.add_state("fires", torch.zeros(d_sae, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, fire_counts: Tensor, n_tokens: int) -> None:
        self.fires += fire_counts.detach().double()
        self.tokens += n_tokens

    def compute(self) -> Tensor:
        return (self.fires / self.tokens.clamp_min(1)).float()


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Batch FVU, the same formula as :class:`FractionOfVarianceUnexplained` for one batch."""
    return fvu_of_residual(x, x - x_hat)


def fvu_of_residual(x: Tensor, residual: Tensor) -> Tensor:
    """:func:`fvu` from ``x`` and an already computed ``x - x_hat``."""
    return residual.pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12)


def human_count(n: int) -> str:
    """``100000 -> '100k'``, ``2500000 -> '2.5M'``: short counts for metric keys."""
    for div, suffix in ((1_000_000_000, "B"), (1_000_000, "M"), (1_000, "k")):
        if n >= div:
            value = n / div
            text = f"{value:.1f}".rstrip("0").rstrip(".")
            return f"{text}{suffix}"
    return str(n)


def dead_fraction_key(window_tokens: int) -> str:
    """The metric key that names its window, e.g. ``train/dead_fraction_100k_tokens``."""
    return f"train/dead_fraction_{human_count(window_tokens)}_tokens"


@torch.no_grad()
def dictionary_recovery(
    true_atoms: Tensor, learned_atoms: Tensor, threshold: float = 0.9
) -> dict[str, float]:
    """How well a learned dictionary recovers known atoms.

    Args:
        true_atoms: ``(n_atoms, d)`` ground-truth directions.
        learned_atoms: ``(d_sae, d)`` learned decoder atoms.
        threshold: cosine similarity at which an atom counts as recovered.

    Returns:
        ``mmcs``: mean over true atoms of the max cosine similarity with any learned atom;
        ``recovered_frac``: fraction of true atoms whose max cosine is >= threshold.
    """
    t = true_atoms.double()
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    w = learned_atoms.detach().double().to(t.device)
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    best = (t @ w.t()).max(dim=1).values  # (n_atoms,)
    return {
        "mmcs": best.mean().item(),
        "recovered_frac": (best >= threshold).double().mean().item(),
    }
