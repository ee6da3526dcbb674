"""Joint TopK over concept maps: concept sparsity by L2 norm, domain sparsity by a fraction."""

from __future__ import annotations

import math

import pytest
import torch
from sae_neural_operator.sparsity import JointTopK, JointTopKConfig, kept_points
from torch.testing import assert_close

from sae_lightning.errors import ConfigError
from sae_lightning.sae import SparseAutoencoder


def joint_topk(
    k: int, fraction: float, p: int, l1: float = 0.0, rank_by: str = "domain", mass: bool = False
) -> JointTopK:
    config = JointTopKConfig(
        k=k, domain_fraction=fraction, l1_coefficient=l1, rank_by=rank_by, normalize_mass=mass
    )
    return JointTopK(config, d_in=1, d_sae=p)


def reference(
    pre: torch.Tensor, k: int, fraction: float, rank_by: str = "domain", mass: bool = False
) -> torch.Tensor:
    """Float64 loop over samples: the k largest quadrature L2 norms, then top points in each."""
    acts = torch.relu(pre.double())
    out = torch.zeros_like(acts)
    n_points = math.prod(acts.shape[2:])
    n_keep = max(1, math.ceil(fraction * n_points - 1e-9))
    for b in range(acts.shape[0]):
        flat = acts[b].reshape(acts.shape[1], -1)
        top = flat.sort(dim=1, descending=True).values[:, :n_keep]
        region = top if rank_by == "kept" else flat
        norms = (region.pow(2).sum(dim=1) / n_points).sqrt()
        for j in sorted(range(flat.shape[0]), key=lambda j: -float(norms[j]))[:k]:
            keep = flat[j].argsort(descending=True)[:n_keep]
            row = torch.zeros_like(flat[j])
            row[keep] = flat[j, keep] / (fraction if mass else 1.0)
            out[b, j] = row.view(acts.shape[2:])
    return out


@pytest.mark.parametrize(
    ("grid", "k", "fraction", "rank_by", "mass"),
    [
        ((40,), 3, 0.1, "domain", False),
        ((6, 10), 2, 0.25, "domain", False),
        ((40,), 3, 0.1, "kept", False),
        ((6, 10), 2, 0.25, "kept", True),
    ],
)
def test_exactly_k_concepts_with_largest_l2_norm_on_the_domain_fraction(
    grid, k, fraction, rank_by, mass
) -> None:
    torch.manual_seed(0)
    p, batch = 7, 5
    pre = torch.randn(batch, p, *grid, dtype=torch.float64) + 0.5  # ties have probability 0
    codes = joint_topk(k, fraction, p, rank_by=rank_by, mass=mass)(pre, step=0, decoder=None)
    codes = codes.codes
    assert codes.indices is None and codes.values.shape == pre.shape
    assert_close(codes.values, reference(pre, k, fraction, rank_by, mass), rtol=0, atol=1e-15)
    active = codes.values.flatten(2) != 0  # (B, p, |N|)
    assert (active.any(dim=2).sum(dim=1) == k).all()  # exactly k concepts per sample
    n_keep = math.ceil(fraction * math.prod(grid))
    per_concept = active.sum(dim=2)
    assert ((per_concept == 0) | (per_concept == n_keep)).all()
    assert (codes.values >= 0).all()
    assert (codes.l0() == k).all()


def test_kept_points_is_a_fraction_of_the_grid_and_at_least_one() -> None:
    assert kept_points(0.1, 30) == 3  # 0.1 * 30 is 3.0000000000000004 in floating point
    assert kept_points(0.1, 64) == 7
    assert kept_points(1e-6, 64) == 1
    assert kept_points(1.0, 64) == 64


@pytest.mark.parametrize("mass", [False, True])
def test_gradient_flows_only_through_kept_entries(mass: bool) -> None:
    torch.manual_seed(1)
    pre = torch.randn(4, 6, 16, dtype=torch.float64, requires_grad=True)
    codes = joint_topk(2, 0.25, 6, mass=mass)(pre, step=0, decoder=None).codes.values
    weights = torch.randn_like(codes)
    (codes * weights).sum().backward()
    kept = (codes != 0).double() / (0.25 if mass else 1.0)
    assert_close(pre.grad, weights * kept, rtol=0, atol=1e-15)
    assert (pre.grad[codes == 0] == 0).all()


def _band_limited_maps(batch: int, p: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps at N and 2N of random trigonometric polynomials (|k| <= 3) with distinct scales."""
    gen = torch.Generator().manual_seed(seed)
    coef = torch.randn(batch, p, 7, 2, generator=gen, dtype=torch.float64)
    coef = coef * torch.linspace(0.5, 2.0, p, dtype=torch.float64).view(1, p, 1, 1)

    def render(grid_n: int) -> torch.Tensor:
        t = torch.arange(grid_n, dtype=torch.float64) / grid_n
        ks = torch.arange(-3, 4, dtype=torch.float64)
        phase = 2 * math.pi * ks.view(-1, 1) * t.view(1, -1)  # (7, N)
        return torch.einsum("bpk,kn->bpn", coef[..., 0], phase.cos()) + torch.einsum(
            "bpk,kn->bpn", coef[..., 1], phase.sin()
        )

    return render(n), render(2 * n)


@pytest.mark.parametrize("rank_by", ["domain", "kept"])
def test_selection_is_resolution_invariant_for_band_limited_maps(rank_by: str) -> None:
    """Same concepts at N and 2N; the kept regions agree up to their boundary points."""
    coarse, fine = _band_limited_maps(16, 8, 64, seed=2)
    sparsity = joint_topk(3, 0.2, 8, rank_by=rank_by)
    z_coarse = sparsity(coarse, step=0, decoder=None).codes.values
    z_fine = sparsity(fine, step=0, decoder=None).codes.values
    concepts_coarse = z_coarse.flatten(2).ne(0).any(2)
    concepts_fine = z_fine.flatten(2).ne(0).any(2)
    assert torch.equal(concepts_coarse, concepts_fine)
    # domain: the kept region at 2N, read at the shared points, differs from the one at N only
    # at region boundaries (a few points per concept out of 64)
    region_coarse = z_coarse != 0
    region_fine = z_fine[..., ::2] != 0
    differ = (region_coarse ^ region_fine).sum(dim=2)[concepts_coarse]
    assert differ.float().mean() < 1.0 and differ.max() <= 3, differ
    assert region_coarse.sum(dim=2)[concepts_coarse].unique().tolist() == [13]  # ceil(.2 * 64)


def test_l1_penalty_is_the_quadrature_integral_and_agrees_across_resolutions() -> None:
    coarse, fine = _band_limited_maps(4, 5, 16, seed=3)
    coarse, fine = coarse + 100.0, fine + 100.0  # positive maps: the ReLU is the identity
    assert coarse.min() > 0 and fine.min() > 0
    sparsity = joint_topk(5, 1.0, 5, l1=0.1)  # keep everything: z = u
    l1_coarse = sparsity(coarse, step=0, decoder=None).losses["l1"]
    l1_fine = sparsity(fine, step=0, decoder=None).losses["l1"]
    exact = 0.1 * coarse.mean(dim=2).sum(dim=1).mean()  # sum_j int z_j, mean over samples
    assert_close(l1_coarse, exact)
    assert_close(l1_fine, l1_coarse, rtol=1e-12, atol=0)
    assert "l1" not in joint_topk(2, 0.5, 5)(coarse, step=0, decoder=None).losses


def test_vector_codes_are_top_k_after_relu() -> None:
    torch.manual_seed(4)
    pre = torch.randn(6, 10, dtype=torch.float64)
    z = joint_topk(3, 0.1, 10)(pre, step=0, decoder=None).codes.values
    top = torch.relu(pre).topk(3, dim=1).indices
    expected = torch.zeros_like(pre).scatter(1, top, torch.relu(pre).gather(1, top))
    assert_close(z, expected, rtol=0, atol=0)


def test_config_errors_name_the_field() -> None:
    for params, field in [
        ({"k": 9}, "model.sparsity.k"),
        ({"k": 0}, "model.sparsity.k"),
        ({"domain_fraction": 0.0}, "model.sparsity.domain_fraction"),
        ({"domain_fraction": 1.5}, "model.sparsity.domain_fraction"),
        ({"l1_coefficient": -1.0}, "model.sparsity.l1_coefficient"),
        ({"rank_by": "norm"}, "model.sparsity.rank_by"),
    ]:
        with pytest.raises(ConfigError) as err:
            SparseAutoencoder(
                2,
                8,
                {"name": "fno", "modes": [4]},
                {"name": "fno"},
                {"name": "joint_topk", **params},
            )
        assert err.value.field == field


def test_joint_topk_inside_an_sae_fno() -> None:
    torch.manual_seed(5)
    sae = SparseAutoencoder(
        2,
        8,
        {"name": "fno", "modes": [4, 4]},
        {"name": "fno"},
        {"name": "joint_topk", "k": 3, "domain_fraction": 0.05},
    )
    u = torch.randn(4, 2, 10, 12)
    out = sae.run(u)
    assert out.codes.values.shape == (4, 8, 10, 12)
    assert (out.codes.l0() <= 3).all()
    per_concept = (out.codes.values != 0).flatten(2).sum(2)
    assert (per_concept <= math.ceil(0.05 * 120)).all()
    assert out.x_hat.shape == u.shape
