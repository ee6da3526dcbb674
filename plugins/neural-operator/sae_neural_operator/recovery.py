"""Model-recovery metrics in function space: dictionary similarity, support, utilization.

Definitions (all integrals by grid quadrature, see :mod:`sae_lightning.functional`):

- **Similarity** of a true atom ``d_i`` and a learned concept ``l_j`` (``C``-channel functions on
  one grid): ``|cos| = |<d_i, l_j>| / (||d_i|| ||l_j||)`` with the L2 inner product. For
  *convolutional* dictionaries (atoms defined up to translation) the **shift-aware** similarity
  is ``max_s |<d_i, l_j(. - s)>| / (||d_i|| ||l_j||)`` over every circular grid shift ``s``,
  computed for all shifts at once as a circular cross-correlation by FFT.
- **Matching**: the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``) pairs each true
  atom with a distinct learned concept, maximising the summed similarity. With fewer learned
  concepts than true atoms the unpaired true atoms score 0.
- **MMCS**: the mean over true atoms of the matched similarity (one learned concept cannot be
  credited for two atoms, unlike the unmatched mean max cosine, also reported as
  ``mean_max_cos``). ``recovered_frac``: fraction of true atoms matched at similarity
  ``>= threshold`` (0.9). ``max_sine``: ``max_i sqrt(1 - cos_i^2)`` (the dictionary error of
  Tolooshams & Ba 2022).
- **Support**: concept ``j`` is active in a sample when its code is nonzero (vector codes) or
  its concept map has L1 mass ``int |z_j| > threshold`` (default 0: nonzero anywhere, as
  ``Codes.l0``). With the matching ``pi`` a learned concept ``pi(i)`` predicts true atom ``i``;
  **precision** = (correctly predicted activations) / (all activations of *any* learned
  concept, matched or not), **recall** = (correctly predicted activations) / (true activations).
- **Utilization**: fraction of learned concepts active in at least one sample of the
  evaluation set (its complement is the dead fraction).
- **Relative L2 error**: ``||u - u_hat|| / ||u||`` per sample.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from sae_lightning.functional import inner_products, l2_norm_sq, quadrature_weight
from sae_lightning.functional import relative_l2 as _relative_l2

__all__ = [
    "Recovery",
    "best_shift",
    "concept_support",
    "functional_mmcs",
    "relative_l2",
    "similarity_matrix",
    "support_precision_recall",
    "utilization",
]


class Recovery(NamedTuple):
    """The result of matching learned concepts to true atoms."""

    mmcs: float
    """Mean over true atoms of the matched ``|cos|`` (0 for an unmatched atom)."""
    recovered_frac: float
    """Fraction of true atoms matched at ``|cos| >= threshold``."""
    mean_max_cos: float
    """Mean over true atoms of the best ``|cos|`` with any learned concept (no matching)."""
    max_sine: float
    """``max_i sqrt(1 - cos_i^2)`` over the matched pairs (1 when an atom is unmatched)."""
    cos: Tensor
    """``(n_true,)`` float64 matched ``|cos|`` per true atom."""
    assignment: Tensor
    """``(n_true,)`` int64 learned concept matched to each true atom, -1 when none."""
    similarity: Tensor
    """``(n_true, n_learned)`` float64 ``|cos|`` matrix (maximised over shifts if shift-aware)."""


def _normalise(u: Tensor) -> Tensor:
    """Functions scaled to unit L2 norm (zero functions stay zero), float64."""
    u = u.double()
    norm = l2_norm_sq(u).sqrt().clamp_min(1e-30)
    return u / norm.reshape(-1, *([1] * (u.ndim - 1)))


def _correlations(ft: Tensor, fw: Tensor, grid: tuple[int, ...]) -> Tensor:
    """``(n_t, n_w, *grid)`` circular cross-correlations from the spectra of two stacks.

    ``corr[i, j, s] = sum_c sum_x t_i(x) w_j(x - s) = <t_i, roll(w_j, s)>`` (grid sums, no
    quadrature weight), all shifts at once: the spectrum is ``conj(W) T`` summed on channels.

    Args:
        ft: ``rfftn`` of ``(n_t, C, *grid)`` over the grid axes.
        fw: ``rfftn`` of ``(n_w, C, *grid)`` over the grid axes.
        grid: the grid (the real transforms' sizes).
    """
    spec = torch.einsum("ic...,jc...->ij...", ft, fw.conj())
    return torch.fft.irfftn(spec, s=grid, dim=tuple(range(-len(grid), 0)))


def best_shift(true: Tensor, learned: Tensor) -> tuple[int, ...]:
    """The circular grid shift ``s`` maximising ``|<true, roll(learned, s)>|``.

    The shift behind the shift-aware similarity (:func:`similarity_matrix`) of one pair:
    ``torch.roll(learned, s, dims=grid axes)`` lines the learned concept up with the true atom.

    Args:
        true: ``(C, *grid)``.
        learned: ``(C, *grid)``, the same grid.
    """
    grid = tuple(true.shape[1:])
    dims = tuple(range(-len(grid), 0))
    ft = torch.fft.rfftn(true.double()[None], dim=dims)
    fw = torch.fft.rfftn(learned.double()[None], dim=dims)
    corr = _correlations(ft, fw, grid)[0, 0]  # (*grid)
    best = int(corr.abs().flatten().argmax())
    return tuple(int(s) for s in torch.unravel_index(torch.tensor(best), grid))


def similarity_matrix(
    true: Tensor, learned: Tensor, shift_aware: bool = False, chunk: int = 16
) -> Tensor:
    """``(n_true, n_learned)`` float64 ``|cos|`` of every true atom with every learned concept.

    Args:
        true: ``(n_true, C, *grid)`` true atoms.
        learned: ``(n_learned, C, *grid)`` learned concept functions on the same grid.
        shift_aware: maximise over all circular grid shifts (convolutional dictionaries).
        chunk: true atoms per FFT block (bounds memory at ``chunk * n_learned * prod(grid)``).

    Raises:
        ValueError: the two stacks have different channels or grids.
    """
    if true.shape[1:] != learned.shape[1:]:
        raise ValueError(
            f"true atoms {tuple(true.shape[1:])} and learned concepts "
            f"{tuple(learned.shape[1:])} must share channels and grid; sample the learned "
            "concepts with concept_functions(grid) at the grid of the true atoms"
        )
    t, w = _normalise(true), _normalise(learned.detach().to(true.device))
    if not shift_aware:
        return inner_products(t, w).abs()
    grid = tuple(t.shape[2:])
    dims = tuple(range(-len(grid), 0))
    ft = torch.fft.rfftn(t, dim=dims)  # (n_true, C, *half-grid)
    fw = torch.fft.rfftn(w, dim=dims)  # (n_learned, C, *half-grid)
    out = []
    for start in range(0, len(ft), chunk):
        corr = _correlations(ft[start : start + chunk], fw, grid)  # (chunk, n_learned, *grid)
        out.append(corr.flatten(2).abs().amax(dim=2) * quadrature_weight(grid))
    return torch.cat(out)


def functional_mmcs(
    true: Tensor, learned: Tensor, shift_aware: bool = False, threshold: float = 0.9
) -> Recovery:
    """Match learned concepts to true atoms (Hungarian on ``|cos|``) and score the matching.

    Args:
        true: ``(n_true, C, *grid)`` true atoms.
        learned: ``(n_learned, C, *grid)`` learned concept functions on the same grid.
        shift_aware: compare up to circular translation (for convolutional SAEs: SAE-FNO,
            SAE-CNN), see :func:`similarity_matrix`.
        threshold: ``|cos|`` at which a true atom counts as recovered.

    Raises:
        ValueError: the two stacks have different channels or grids.
    """
    sim = similarity_matrix(true, learned, shift_aware)
    rows, cols = linear_sum_assignment(sim.cpu().numpy(), maximize=True)
    n_true = sim.shape[0]
    assignment = torch.full((n_true,), -1, dtype=torch.long)
    assignment[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    cos = torch.zeros(n_true, dtype=torch.float64)
    matched = assignment >= 0
    cos[matched] = sim.cpu()[matched.nonzero().squeeze(1), assignment[matched]]
    cos = cos.clamp(0.0, 1.0)
    best = sim.amax(dim=1) if sim.shape[1] else torch.zeros(n_true, dtype=torch.float64)
    return Recovery(
        mmcs=float(cos.mean()),
        recovered_frac=float((cos >= threshold).double().mean()),
        mean_max_cos=float(best.mean()),
        max_sine=float((1 - cos**2).clamp_min(0).sqrt().max()),
        cos=cos,
        assignment=assignment,
        similarity=sim,
    )


def concept_support(codes: Tensor, threshold: float = 0.0) -> Tensor:
    """``(B, p)`` bool: which concepts are active in each sample.

    Args:
        codes: dense codes, vector ``(B, p)`` or concept maps ``(B, p, *grid)``.
        threshold: a vector code is active when ``|z_j| > threshold``; a concept map when its
            L1 mass ``int |z_j|`` (quadrature) is ``> threshold``. At 0 (default): nonzero.
    """
    if codes.ndim == 2:
        return codes.abs() > threshold
    if threshold == 0:
        return (codes != 0).flatten(2).any(dim=2)
    mass = codes.abs().flatten(2).sum(dim=2) * quadrature_weight(tuple(codes.shape[2:]))
    return mass > threshold


def support_precision_recall(
    active: Tensor, true_support: Tensor, assignment: Tensor
) -> tuple[float, float]:
    """Support recovery after matching: ``(precision, recall)``.

    Args:
        active: ``(B, p)`` bool learned-concept activity (:func:`concept_support`).
        true_support: ``(B, n_true)`` bool, which true atoms generated each sample.
        assignment: ``(n_true,)`` learned concept matched to each true atom, -1 when none
            (:attr:`Recovery.assignment`).

    Returns:
        precision: true positives over all learned activations (an active unmatched concept
            is a false positive); 1.0 when nothing is active.
        recall: true positives over all true activations; 1.0 when no atom is active.
    """
    active, true_support = active.bool().cpu(), true_support.bool().cpu()
    matched = assignment >= 0
    predicted = torch.zeros_like(true_support)
    predicted[:, matched] = active[:, assignment[matched]]
    hits = int((predicted & true_support).sum())
    fired, truth = int(active.sum()), int(true_support.sum())
    return (hits / fired if fired else 1.0), (hits / truth if truth else 1.0)


def utilization(active: Tensor) -> float:
    """Fraction of concepts active in at least one sample of ``active (B, p)``."""
    return float(active.bool().any(dim=0).double().mean())


def relative_l2(u: Tensor, u_hat: Tensor) -> Tensor:
    """``(B,)`` relative L2 errors ``||u - u_hat|| / ||u||`` (quadrature), in float64."""
    return _relative_l2(u.double(), u_hat.double())
