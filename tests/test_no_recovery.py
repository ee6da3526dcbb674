"""Functional recovery metrics against float64 brute-force references."""

from __future__ import annotations

import pytest
import torch
from sae_neural_operator.recovery import (
    concept_support,
    functional_mmcs,
    relative_l2,
    similarity_matrix,
    support_precision_recall,
    utilization,
)
from torch.testing import assert_close

SEEDS = [0, 1, 2]


def brute_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """|cos| of two functions by explicit sums (quadrature weights cancel in the ratio)."""
    a, b = a.double().flatten(), b.double().flatten()
    return abs(float((a * b).sum() / (a.norm() * b.norm())))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("grid", [(12,), (6, 5)])
def test_similarity_matrix_matches_brute_force(seed: int, grid: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(3, 2, *grid, generator=g, dtype=torch.float64)
    learned = torch.randn(4, 2, *grid, generator=g).float()
    plain = similarity_matrix(true, learned)
    shifted = similarity_matrix(true, learned, shift_aware=True, chunk=2)
    dims = tuple(range(-len(grid), 0))
    for i in range(3):
        for j in range(4):
            assert plain[i, j].item() == pytest.approx(brute_cos(true[i], learned[j]), abs=1e-6)
            rolls = [
                brute_cos(true[i], torch.roll(learned[j], shifts, dims))
                for shifts in torch.cartesian_prod(*[torch.arange(n) for n in grid])
                .reshape(-1, len(grid))
                .tolist()
            ]
            assert shifted[i, j].item() == pytest.approx(max(rolls), abs=1e-6)
    assert (shifted >= plain - 1e-9).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_mmcs_recovers_a_permuted_rescaled_sign_flipped_dictionary(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(5, 1, 16, 16, generator=g, dtype=torch.float64)
    perm = torch.randperm(7, generator=g)[:5]
    learned = torch.randn(7, 1, 16, 16, generator=g, dtype=torch.float64)
    scale = torch.rand(5, generator=g, dtype=torch.float64) * 3 + 0.1
    sign = torch.where(torch.rand(5, generator=g) < 0.5, -1.0, 1.0).double()
    learned[perm] = true * (scale * sign)[:, None, None, None]
    rec = functional_mmcs(true, learned)
    assert rec.mmcs == pytest.approx(1.0, abs=1e-12)
    assert rec.recovered_frac == 1.0
    assert rec.max_sine == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(rec.assignment, perm)


def test_mmcs_credits_one_learned_concept_once() -> None:
    # Both true atoms are closest to learned concept 0: the unmatched mean max |cos| counts it
    # twice, the Hungarian matching must pair atom 1 with the worse concept 1.
    e = torch.eye(3, dtype=torch.float64)[:, None, :]  # (3, 1, 3) orthonormal "functions"
    true = torch.stack([e[0], (e[0] + 0.2 * e[1]) / (1.04**0.5)])
    learned = torch.stack([e[0], e[1]])
    rec = functional_mmcs(true, learned)
    assert rec.mean_max_cos == pytest.approx((1 + 1 / 1.04**0.5) / 2)
    assert rec.mmcs == pytest.approx((1 + 0.2 / 1.04**0.5) / 2)
    assert rec.assignment.tolist() == [0, 1]


def test_shift_aware_mmcs_recovers_translated_atoms() -> None:
    g = torch.Generator().manual_seed(4)
    true = torch.randn(4, 2, 32, generator=g, dtype=torch.float64)
    learned = torch.stack([torch.roll(true[i], 5 * i + 1, -1) for i in (2, 0, 3, 1)])
    assert functional_mmcs(true, learned).mmcs < 0.6
    rec = functional_mmcs(true, learned, shift_aware=True)
    assert rec.mmcs == pytest.approx(1.0, abs=1e-12)
    assert rec.assignment.tolist() == [1, 3, 0, 2]


def test_fewer_learned_concepts_leave_atoms_unmatched() -> None:
    true = torch.eye(4, dtype=torch.float64)[:, None, :]
    rec = functional_mmcs(true, true[[2, 0]])
    assert sorted(rec.assignment.tolist()) == [-1, -1, 0, 1]
    assert rec.mmcs == pytest.approx(0.5)
    assert rec.max_sine == 1.0


def test_grid_mismatch_is_an_error_naming_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(1, 16\).*\(1, 32\)"):
        functional_mmcs(torch.randn(2, 1, 16), torch.randn(2, 1, 32))


def test_concept_support_vectors_and_maps() -> None:
    codes = torch.tensor([[0.0, 0.5, -0.1], [2.0, 0.0, 0.0]])
    assert concept_support(codes).tolist() == [[False, True, True], [True, False, False]]
    assert concept_support(codes, 0.2).tolist() == [[False, True, False], [True, False, False]]
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0, 1, 1] = 8.0  # L1 mass 8 / 16 = 0.5
    maps[0, 1, 2, 3] = 1.0  # mass 1 / 16
    assert concept_support(maps).tolist() == [[True, True]]
    assert concept_support(maps, 0.1).tolist() == [[True, False]]


def test_support_precision_recall_hand_example() -> None:
    true_support = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)  # 3 true activations
    assignment = torch.tensor([2, 0, -1])  # atom 2 is unmatched
    active = torch.tensor(
        [
            [False, True, True, True],  # concept 2 -> atom 0 hit; 1 and 3 unmatched: false +
            [True, False, False, False],  # concept 0 -> atom 1 hit
        ]
    )
    precision, recall = support_precision_recall(active, true_support, assignment)
    assert precision == pytest.approx(2 / 4)
    assert recall == pytest.approx(2 / 3)


def test_utilization_counts_concepts_used_at_least_once() -> None:
    active = torch.tensor([[1, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    assert utilization(active) == 0.5


@pytest.mark.parametrize("seed", SEEDS)
def test_relative_l2_matches_explicit_formula(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(3, 2, 8, 6, generator=g)
    u_hat = u + 0.1 * torch.randn(3, 2, 8, 6, generator=g)
    ref = (u - u_hat).double().flatten(1).norm(dim=1) / u.double().flatten(1).norm(dim=1)
    assert_close(relative_l2(u, u_hat), ref)
