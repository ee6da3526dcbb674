"""The sparse functional generative model: exact continuous atoms, any resolution, resume, DDP."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from sae_neural_operator.data.functions import BumpAtoms, FourierAtoms
from sae_neural_operator.data.synthetic import (
    FunctionSyntheticConfig,
    FunctionSyntheticDataModule,
)
from torch import nn
from torch.testing import assert_close

from sae_lightning.components.base import Codes
from sae_lightning.functional import inner_products
from sae_lightning.registry import registry

SEEDS = [0, 1, 2]


def make(seed: int = 0, **params: object) -> FunctionSyntheticDataModule:
    base: dict[str, object] = {"n_atoms": 6, "batch_size": 8, "val_samples": 10, "grid": 16}
    base.update(params)
    return FunctionSyntheticDataModule(FunctionSyntheticConfig(**base), seed=seed)


def every_other(u: torch.Tensor, dims: int) -> torch.Tensor:
    return u[(slice(None), slice(None)) + (slice(None, None, 2),) * dims]


# ---- atoms are the continuous functions they claim to be -------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dims", [1, 2])
def test_fourier_atoms_match_direct_evaluation_even_below_nyquist(seed: int, dims: int) -> None:
    g = torch.Generator().manual_seed(seed)
    family = FourierAtoms(3, 2, dims, k_max=5, decay=1.0, generator=g)
    shift = torch.rand(1, 3, dims, generator=g, dtype=torch.float64)
    scale = torch.randn(1, 3, generator=g, dtype=torch.float64)
    grid = (7,) * dims  # fewer points than 2 k_max + 1: coefficients alias, values must not
    got = family.render(torch.arange(3)[None], scale, shift, grid)
    axes = [torch.arange(n, dtype=torch.float64) / n for n in grid]
    x = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)  # (*grid, d)
    ref = torch.zeros(2, *grid, dtype=torch.float64)
    for s in range(3):
        phase = torch.exp(2j * math.pi * ((x - shift[0, s]) @ family.freqs.double().T))
        ref += scale[0, s] * (phase @ family.coeffs[s].T).real.movedim(-1, 0)
    assert_close(got[0], ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dims", [1, 2])
def test_bump_atoms_match_direct_evaluation(seed: int, dims: int) -> None:
    g = torch.Generator().manual_seed(seed)
    family = BumpAtoms(2, 2, dims, width=0.15, bumps=3, generator=g)
    shift = torch.rand(1, 2, dims, generator=g, dtype=torch.float64)
    grid = (11,) * dims
    got = family.render(torch.tensor([[1, 0]]), torch.tensor([[1.5, -0.5]]).double(), shift, grid)
    axes = [torch.arange(n, dtype=torch.float64) / n for n in grid]
    x = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    images = torch.cartesian_prod(*[torch.arange(-4, 5, dtype=torch.float64)] * dims)
    images = images.reshape(-1, dims)
    ref = torch.zeros(2, *grid, dtype=torch.float64)
    for slot, (atom, amp) in enumerate(((1, 1.5), (0, -0.5))):
        for b in range(3):
            centre = family.centres[atom, b] + shift[0, slot]
            r2 = ((x[..., None, :] - centre - images) ** 2).sum(-1)  # (*grid, images)
            bump = torch.exp(-r2 / (2 * family.widths[atom, b] ** 2)).sum(-1)
            ref += amp * family.weights[atom, :, b].reshape(2, *[1] * dims) * bump
    assert_close(got[0], ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["fourier", "bumps"])
@pytest.mark.parametrize("dims", [1, 2])
def test_true_atoms_have_unit_l2_norm(family: str, dims: int) -> None:
    dm = make(family=family, dims=dims, channels=2, bump_width=0.08)
    atoms = dm.true_concepts((128,) * dims, torch.float64)
    gram = inner_products(atoms, atoms)  # quadrature is spectrally accurate for these
    assert_close(gram.diagonal(), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-9)
    assert (gram - torch.diag(gram.diagonal())).abs().max() < 0.99  # distinct atoms


@pytest.mark.parametrize("family", ["fourier", "bumps"])
@pytest.mark.parametrize("dims", [1, 2])
def test_same_sample_renders_consistently_at_every_resolution(family: str, dims: int) -> None:
    dm = make(family=family, dims=dims, channels=2, noise_std=0.1, bump_width=0.08)
    coarse, support = dm.validation_set((16,) * dims, dtype=torch.float64)
    fine, support_fine = dm.validation_set((32,) * dims, dtype=torch.float64)
    finer, _ = dm.validation_set((64,) * dims, dtype=torch.float64)
    assert_close(every_other(fine, dims), coarse, rtol=0, atol=1e-12)
    assert_close(every_other(every_other(finer, dims), dims), coarse, rtol=0, atol=1e-12)
    assert torch.equal(support, support_fine)
    assert (support.sum(1) == 3).all()
    atoms = dm.true_concepts((32,) * dims)
    assert_close(every_other(atoms, dims), dm.true_concepts((16,) * dims))


@pytest.mark.parametrize("seed", SEEDS)
def test_unshifted_clean_samples_are_sums_of_true_atoms(seed: int) -> None:
    dm = make(seed, shifts="none", sign="random", dims=2, channels=3)
    params = dm.generative.val_params()
    u, support = dm.validation_set((20, 12), noise=False, dtype=torch.float64)
    atoms = dm.true_concepts((20, 12), torch.float64)
    codes = torch.zeros(10, 6, dtype=torch.float64)
    codes.scatter_(1, params.atoms, params.amplitudes)
    assert_close(u, torch.einsum("bj,jc...->bc...", codes, atoms), rtol=0, atol=1e-12)
    assert torch.equal(support, codes != 0)
    assert (codes.abs()[support] >= 1).all() and (codes.abs() <= 2).all()
    assert (codes < 0).any()  # sign: random


def test_grid_shift_of_a_fourier_atom_is_a_roll() -> None:
    dm = make(dims=1, grid=32)
    family = dm.generative.family
    atom = family.render(
        torch.tensor([[4]]), torch.ones(1, 1).double(), torch.tensor([[[5 / 32]]]).double(), (32,)
    )
    assert_close(atom[0], torch.roll(dm.true_concepts((32,), torch.float64)[4], 5, -1))


def test_noise_has_the_configured_mean_square_at_every_resolution() -> None:
    dm = make(dims=1, noise_std=0.3, val_samples=2000, amplitude_min=1e-9, amplitude_max=1e-9)
    for n in (48, 96):
        u, _ = dm.validation_set((n,), dtype=torch.float64)
        assert u.pow(2).mean().item() == pytest.approx(0.09, rel=0.05)


# ---- the DataModule ----------------------------------------------------------------------------


def test_batches_are_float32_deterministic_and_registered() -> None:
    cls = registry.get("datamodules", "function_synthetic")
    dm = cls(cls.Config(dims=2, grid=16, channels=2, batch_size=4, max_bandwidth=4), seed=3)
    dm.setup()
    b0 = dm.rank_batch(0)
    assert b0.shape == (4, 2, 16, 16) and b0.dtype == torch.float32
    assert dm.d_in == 2 and dm.train_grid == (16, 16)
    assert torch.equal(b0, dm.rank_batch(0))
    assert not torch.equal(b0, dm.rank_batch(1))
    assert torch.equal(b0, next(iter(dm.train_dataloader())))


def test_ddp_ranks_take_disjoint_slices_of_the_global_batch() -> None:
    whole = make(batch_size=8).rank_batch(7)
    parts = []
    for rank in range(2):
        dm = make(batch_size=8)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)  # type: ignore[assignment]
        parts.append(dm.rank_batch(7))
    assert_close(torch.cat(parts), whole, rtol=0, atol=0)


def test_resume_continues_at_the_checkpointed_batch() -> None:
    dm = make()
    dm.consumed.count = 5
    state = dm.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    batches = iter(resumed.train_dataloader())
    assert torch.equal(next(batches), dm.rank_batch(5))
    assert torch.equal(next(batches), dm.rank_batch(6))


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"n_active": 9}, "n_active=9 exceeds n_atoms=6"),
        ({"grid": 12, "max_bandwidth": 6}, "needs grid > 2 x max_bandwidth"),
        ({"family": "bumps", "bump_width": 0.01}, "under one grid step"),
        ({"amplitude_min": 3.0}, "amplitude_min=3.0 exceeds amplitude_max=2.0"),
    ],
)
def test_inconsistent_configs_are_refused(params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(**params)


def test_grid_of_the_wrong_dimension_is_refused() -> None:
    with pytest.raises(ValueError, match="2-D domain"):
        make(dims=2).validation_set((32,))


# ---- reference metrics with stand-in SAEs -------------------------------------------------------


class OracleDecoder(nn.Module):
    """Concepts are the true atoms, permuted, rescaled and (optionally) rolled."""

    def __init__(self, atoms_fn, perm: torch.Tensor, roll: int, convolutional: bool) -> None:
        super().__init__()
        self.atoms_fn, self.perm, self.roll = atoms_fn, perm, roll
        self.convolutional = convolutional
        self.w = nn.Parameter(torch.zeros(1))

    def concept_functions(self, grid: tuple[int, ...]) -> torch.Tensor:
        atoms = self.atoms_fn(grid)
        out = torch.zeros(len(self.perm) + 2, *atoms.shape[1:])
        out[self.perm] = 2.5 * torch.roll(atoms, self.roll, -1)
        out[-2:] = torch.randn(2, *atoms.shape[1:])  # extra, never-used concepts
        return out


class OracleSAE(nn.Module):
    def __init__(self, dm: FunctionSyntheticDataModule, roll: int, convolutional: bool) -> None:
        super().__init__()
        self.perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
        self.decoder = OracleDecoder(dm.true_concepts, self.perm, roll, convolutional)
        self.support = dm.validation_set(dm.train_grid)[1]
        self.seen = 0

    def encode_codes(self, u: torch.Tensor) -> Codes:
        rows = self.support[self.seen : self.seen + len(u)]
        self.seen += len(u)
        codes = torch.zeros(len(u), 8)
        codes[:, self.perm] = rows.float()
        return Codes(codes, None, 8)


def test_reference_metrics_are_perfect_for_the_true_dictionary() -> None:
    dm = make(shifts="none", val_batch_size=4)
    metrics = dm.reference_metrics(OracleSAE(dm, roll=0, convolutional=False))
    assert metrics["mmcs"] == pytest.approx(1.0)
    assert metrics["recovered_frac"] == 1.0
    assert metrics["support_precision"] == 1.0 and metrics["support_recall"] == 1.0
    assert metrics["utilization"] == pytest.approx(6 / 8)


def test_reference_metrics_match_convolutional_concepts_up_to_translation() -> None:
    dm = make()
    assert dm.reference_metrics(OracleSAE(dm, roll=3, convolutional=True))["mmcs"] == (
        pytest.approx(1.0)
    )
    assert dm.reference_metrics(OracleSAE(dm, roll=3, convolutional=False))["mmcs"] < 0.9


def test_reference_metrics_refuse_a_vector_decoder() -> None:
    dm = make()
    sae = SimpleNamespace(decoder=nn.Linear(2, 2))
    with pytest.raises(TypeError, match="concept_functions"):
        dm.reference_metrics(sae)  # type: ignore[arg-type]


def test_support_threshold_ignores_weak_concept_maps() -> None:
    dm = make(val_batch_size=5, support_threshold=0.5)

    class WeakMaps(OracleSAE):
        def encode_codes(self, u: torch.Tensor) -> Codes:
            rows = self.support[self.seen : self.seen + len(u)]
            self.seen += len(u)
            maps = torch.full((len(u), 8, 16), 0.01)  # mass 0.01 everywhere: below threshold
            maps[:, self.perm, 3] += 16 * rows.float()  # mass 1 where the atom is active
            return Codes(maps, None, 8)

    metrics = dm.reference_metrics(WeakMaps(dm, roll=0, convolutional=True))
    assert metrics["support_precision"] == 1.0 and metrics["support_recall"] == 1.0
    loose = make(val_batch_size=5).reference_metrics(WeakMaps(dm, roll=0, convolutional=True))
    assert loose["support_precision"] == pytest.approx(3 / 8)  # every map counts as active
