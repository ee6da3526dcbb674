"""PDE generators (Darcy, Burgers, Navier-Stokes), the dataset cache, file loaders, pde_fields."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import h5py
import lightning.pytorch as pl
import pytest
import torch
from sae_neural_operator.data import cache
from sae_neural_operator.data.burgers import Burgers, BurgersConfig, solve_burgers
from sae_neural_operator.data.darcy import (
    Darcy,
    DarcyConfig,
    darcy_matrix,
    darcy_residual,
    solve_darcy,
)
from sae_neural_operator.data.loaders import DatasetFileError, load_fields
from sae_neural_operator.data.navier_stokes import (
    NavierStokes,
    NavierStokesConfig,
    solve_navier_stokes,
)
from sae_neural_operator.data.pde import PDEFieldConfig, PDEFieldDataModule
from torch.testing import assert_close

from sae_lightning.errors import ConfigError
from sae_lightning.registry import registry

SEEDS = [0, 1, 2]


def noise(gen, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([gen.noise(g) for _ in range(n)])


def sub(u: torch.Tensor, r: int) -> torch.Tensor:
    """Every ``r``-th point of ``(B, *grid)`` fields."""
    return u[(slice(None),) + (slice(None, None, r),) * (u.ndim - 1)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- Darcy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("coefficient", ["piecewise", "lognormal"])
@pytest.mark.parametrize("average", ["harmonic", "arithmetic"])
def test_darcy_solution_satisfies_the_discrete_pde(
    seed: int, coefficient: str, average: str
) -> None:
    darcy = Darcy(DarcyConfig(coefficient=coefficient, face_average=average))
    a = darcy.coefficient(noise(darcy, 2, seed), 24)  # (2, 25, 25) with both boundaries
    f = 1 + torch.rand(a.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u = solve_darcy(a, f, average)
    assert (darcy_residual(a, u, f, average) < 1e-6).all()
    assert (u[:, 0] == 0).all() and (u[:, -1] == 0).all()
    assert (u[:, :, 0] == 0).all() and (u[:, :, -1] == 0).all()
    assert (u[:, 1:-1, 1:-1] > 0).all()  # maximum principle: f > 0 gives u > 0 inside
    matrix = darcy_matrix(a[0], average)
    assert abs(matrix - matrix.T).max() < 1e-12  # symmetric, as a flux-form scheme must be


def test_darcy_residual_detects_a_wrong_solution() -> None:
    darcy = Darcy(DarcyConfig())
    a = darcy.coefficient(noise(darcy, 1, 0), 16)
    f = torch.ones_like(a)
    u = solve_darcy(a, f)
    u[0, 5, 7] *= 1.001
    assert darcy_residual(a, u, f) > 1e-4


def test_darcy_piecewise_coefficient_takes_the_two_values() -> None:
    darcy = Darcy(DarcyConfig())
    a, u = darcy.solve(noise(darcy, 3, 1), 32)
    assert a.shape == u.shape == (3, 32, 32)
    assert set(a.unique().tolist()) == {3.0, 12.0}


def test_darcy_manufactured_solution_converges_at_second_order() -> None:
    errors = []
    for n in (8, 16, 32):
        x = torch.arange(n + 1, dtype=torch.float64) / n
        exact = torch.outer(torch.sin(math.pi * x), torch.sin(math.pi * x))[None]
        a = (1 + torch.outer(x, x))[None]  # smooth a = 1 + x y
        # f = -div(a grad u) for u = sin(pi x) sin(pi y), a = 1 + x y
        sx, cx = torch.sin(math.pi * x), torch.cos(math.pi * x)
        f = (2 * math.pi**2 * a[0] * torch.outer(sx, sx)) - math.pi * (
            x[None, :] * torch.outer(cx, sx) + x[:, None] * torch.outer(sx, cx)
        )
        errors.append(float((solve_darcy(a, f[None]) - exact).abs().max()))
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    assert all(3.5 < r < 4.5 for r in ratios), ratios


def test_darcy_subsampled_fine_solutions_converge_at_second_order() -> None:
    # Smooth (log-normal) permeability: the 5-point scheme is second order, so the error of a
    # direct coarse solve against the subsampled reference drops ~4x per halving of h.
    darcy = Darcy(DarcyConfig(coefficient="lognormal", modes=8))
    xi = noise(darcy, 2, 5)
    _, ref = darcy.solve(xi, 128)
    errors = [rel(darcy.solve(xi, n)[1], sub(ref, 128 // n)) for n in (16, 32)]
    assert 3.3 < errors[0] / errors[1] < 5, errors
    a, _ = darcy.solve(xi, 16)
    # The same field at every grid, computed on different grids: equal within rounding.
    assert_close(a, sub(darcy.solve(xi, 128)[0], 8), rtol=1e-12, atol=1e-12)


# ---- Burgers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_burgers_conserves_mass_to_rounding(seed: int) -> None:
    burgers = Burgers(BurgersConfig())
    u0 = burgers.initial(noise(burgers, 3, seed), 64) + torch.tensor([[0.3], [-0.7], [1.1]])
    u = solve_burgers(u0, 0.05, 0.5, 1e-3)
    assert_close(u.mean(-1), u0.mean(-1), rtol=0, atol=1e-13)
    assert rel(u, u0) > 0.1  # it did evolve


def test_burgers_matches_the_cole_hopf_solution_at_fourth_order_in_time() -> None:
    # u = -2 nu phi_x / phi with phi a solution of the heat equation solves Burgers exactly.
    nu, t_end, n = 0.1, 0.5, 64
    x = torch.arange(n, dtype=torch.float64) / n

    def exact(t: float) -> torch.Tensor:
        e1, e2 = math.exp(-nu * 4 * math.pi**2 * t), math.exp(-nu * 16 * math.pi**2 * t)
        phi = 2 + torch.cos(2 * math.pi * x) * e1 + 0.5 * torch.sin(4 * math.pi * x + 1) * e2
        phi_x = (
            -2 * math.pi * torch.sin(2 * math.pi * x) * e1
            + 2 * math.pi * torch.cos(4 * math.pi * x + 1) * e2
        )
        return (-2 * nu * phi_x / phi)[None]

    errors = [
        float((solve_burgers(exact(0), nu, t_end, dt) - exact(t_end)).abs().max())
        for dt in (1e-2, 5e-3)
    ]
    assert errors[1] < 2e-9
    assert 10 < errors[0] / errors[1] < 20, errors  # ETDRK4: ~16


def test_burgers_subsampled_fine_solutions_agree_spectrally() -> None:
    burgers = Burgers(BurgersConfig(modes=8, final_time=0.5))
    xi = noise(burgers, 2, 3)
    _, ref = burgers.solve(xi, 256)
    errors = [rel(burgers.solve(xi, n)[1], sub(ref, 256 // n)) for n in (32, 64)]
    # spectral accuracy: doubling the grid gains orders of magnitude, not a fixed factor
    assert errors[1] < 1e-9 and errors[0] / errors[1] > 1e3, errors


def test_burgers_refuses_an_unstable_time_step() -> None:
    burgers = Burgers(BurgersConfig(dt=0.05))
    with pytest.raises(ConfigError, match=r"data\.burgers\.dt"):
        burgers.solve(noise(burgers, 1, 0), 256)


# ---- Navier-Stokes -----------------------------------------------------------------------------


def test_navier_stokes_shell_mode_decays_at_the_viscous_rate() -> None:
    # A vorticity on one wavenumber shell makes v . grad w vanish: w(t) = w0 exp(-nu L t).
    n, nu, t_end = 16, 0.01, 1.0
    x = torch.arange(n, dtype=torch.float64) / n
    s, d = x[:, None] + x[None, :], x[:, None] - x[None, :]
    w0 = (torch.sin(2 * math.pi * s) + 0.5 * torch.cos(2 * math.pi * d + 0.3))[None]
    errors = []
    for dt in (0.02, 0.01):
        w = solve_navier_stokes(w0, nu, t_end, dt, forcing=False)
        errors.append(float((w - w0 * math.exp(-nu * 8 * math.pi**2 * t_end)).abs().max()))
    assert errors[1] < 5e-6 and 3.5 < errors[0] / errors[1] < 4.5  # Crank-Nicolson: 2nd order
    w1 = (torch.sin(2 * math.pi * s) + 0.5 * torch.cos(4 * math.pi * x)[:, None]).expand(1, n, n)
    assert rel(solve_navier_stokes(w1, nu, t_end, 0.01, forcing=False), w1) > 0.1  # advects


def test_navier_stokes_subsampled_fine_solutions_agree_spectrally() -> None:
    ns = NavierStokes(NavierStokesConfig(modes=4, final_time=0.5, dt=0.01))
    xi = noise(ns, 2, 0)
    w0, ref = ns.solve(xi, 64)
    errors = [rel(ns.solve(xi, n)[1], sub(ref, 64 // n)) for n in (16, 32)]
    assert errors[1] < 1e-5 and errors[0] / errors[1] > 100, errors
    assert_close(ns.solve(xi, 16)[0], sub(w0, 4), rtol=0, atol=1e-12)
    assert ref.mean(dim=(-1, -2)).abs().max() < 1e-12  # zero-mean vorticity stays zero-mean


# ---- cache -------------------------------------------------------------------------------------


def test_cache_reuses_regenerates_and_detects_corruption(tmp_path: Path) -> None:
    calls, messages = [], []

    def gen(value: float):
        def make() -> cache.Files:
            calls.append(value)
            return {
                "train_8": {"input": torch.full((2, 1, 8), value)},
                "val_8": {"input": torch.zeros(1, 1, 8)},
            }

        return make

    identity = {"equation": "darcy", "darcy": {"alpha": 2.0}, "seed": 0}
    first = cache.load_or_generate(tmp_path, identity, gen(1.0), log=messages.append)
    again = cache.load_or_generate(tmp_path, identity, gen(9.0), log=messages.append)
    assert calls == [1.0] and torch.equal(again["train_8"]["input"], first["train_8"]["input"])
    assert "reusing" in messages[-1]
    changed = {**identity, "darcy": {"alpha": 2.5}}
    cache.load_or_generate(tmp_path, changed, gen(2.0), log=messages.append)
    assert calls == [1.0, 2.0]
    assert "regenerating" in messages[-1] and "darcy.alpha: 2.0 -> 2.5" in messages[-1]
    (tmp_path / "train_8.safetensors").write_bytes(b"garbage")
    cache.load_or_generate(tmp_path, changed, gen(3.0), log=messages.append)
    assert calls == [1.0, 2.0, 3.0] and "sha256" in messages[-1]
    assert not list(tmp_path.glob(".*.tmp"))


def test_cache_removes_files_of_the_previous_dataset(tmp_path: Path) -> None:
    cache.write(
        tmp_path, {"a": 1}, {"val_32": {"x": torch.zeros(1)}, "val_16": {"x": torch.zeros(1)}}
    )
    cache.write(tmp_path, {"a": 2}, {"val_16": {"x": torch.ones(1)}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "val_16.safetensors"]


# ---- loaders -----------------------------------------------------------------------------------


def test_pt_loader_reads_both_layouts_and_names_missing_keys(tmp_path: Path) -> None:
    x, y = torch.randn(5, 8, 8), torch.randn(5, 2, 8, 8)
    torch.save({"x": x, "y": y, "meta": torch.zeros(1)}, tmp_path / "d.pt")
    fields = load_fields(tmp_path / "d.pt", {"input": "x", "solution": "y"})
    assert fields["input"].shape == (5, 1, 8, 8) and fields["solution"].shape == (5, 2, 8, 8)
    assert_close(fields["input"][:, 0], x.double())
    with pytest.raises(DatasetFileError, match=r"d\.pt has no 'u'.*\['meta', 'x', 'y'\]"):
        load_fields(tmp_path / "d.pt", {"input": "u"})
    torch.save([x], tmp_path / "list.pt")
    with pytest.raises(DatasetFileError, match=r"list\.pt holds a list"):
        load_fields(tmp_path / "list.pt", {"input": "x"})
    with pytest.raises(FileNotFoundError, match=r"nothing\.pt"):
        load_fields(tmp_path / "nothing.pt", {"input": "x"})


def test_h5_loader_reads_named_datasets(tmp_path: Path) -> None:
    a, u = torch.randn(4, 16), torch.randn(4, 16, 3)
    with h5py.File(tmp_path / "b.h5", "w") as fh:
        fh["train/a"] = a.numpy()
        fh["train/u"] = u.numpy()
    fields = load_fields(tmp_path / "b.h5", {"input": "train/a"}, dims=1)
    assert fields["input"].shape == (4, 1, 16)
    last = load_fields(tmp_path / "b.h5", {"solution": "train/u"}, channels_last=True)
    assert_close(last["solution"], u.double().movedim(-1, 1))
    with pytest.raises(DatasetFileError, match=r"b\.h5 has no 'train/x'.*train/a"):
        load_fields(tmp_path / "b.h5", {"input": "train/x"})


def test_loader_refuses_fields_of_different_grids(tmp_path: Path) -> None:
    torch.save({"x": torch.zeros(3, 8, 8), "y": torch.zeros(3, 4, 4)}, tmp_path / "d.pt")
    with pytest.raises(DatasetFileError, match="disagree"):
        load_fields(tmp_path / "d.pt", {"input": "x", "solution": "y"})


# ---- the DataModule ----------------------------------------------------------------------------


def small(tmp_path: Path | None = None, **params: object) -> PDEFieldDataModule:
    base: dict[str, object] = {
        "equation": "darcy",
        "n_samples": 6,
        "val_samples": 3,
        "resolution": 8,
        "batch_size": 4,
        "darcy": {"modes": 6},
    }
    if tmp_path is not None:
        base["cache_dir"] = str(tmp_path / "cache")
    base.update(params)
    return PDEFieldDataModule(PDEFieldConfig(**base), seed=1)


def test_pde_fields_is_registered_and_serves_every_resolution(tmp_path: Path) -> None:
    cls = registry.get("datamodules", "pde_fields")
    assert cls is PDEFieldDataModule
    dm = small(tmp_path, field="both", eval_resolutions=[16, 32])
    dm.prepare_data()
    dm.setup()
    assert dm.d_in == 2 and dm.train_grid == (8, 8)
    batch = dm.rank_batch(0)
    assert batch.shape == (4, 2, 8, 8) and batch.dtype == torch.float32
    train = dm._train
    assert_close(train.pow(2).mean(dim=(0, 2, 3)), torch.ones(2))  # normalize: unit
    v8, v16, v32 = (dm.validation_set((n, n))[0] for n in (8, 16, 32))
    assert torch.equal(v8, v16[..., ::2, ::2]) and torch.equal(v8, v32[..., ::4, ::4])
    with pytest.raises(ValueError, match=r"add 64 to data.eval_resolutions"):
        dm.validation_set((64, 64))
    reloaded = small(tmp_path, field="both", eval_resolutions=[16, 32])
    reloaded.setup()  # from the cache
    assert torch.equal(reloaded._train, train)


def test_pde_fields_generation_does_not_depend_on_the_cache_or_batching(tmp_path: Path) -> None:
    cached = small(tmp_path, field="solution")
    cached.setup()
    plain = small(None, field="solution", generation_batch=4)
    plain.setup()
    assert torch.equal(cached._train, plain._train)
    more = small(None, field="solution", n_samples=8, normalize="none")
    more.setup()
    raw = small(None, field="solution", normalize="none")
    raw.setup()
    assert torch.equal(more._train[:6], raw._train)  # sample i depends on i alone


def test_pde_fields_epochs_permute_samples_ddp_slices_and_resume() -> None:
    dm = small(None, n_samples=8)
    dm.setup()
    epoch = torch.cat([dm.batch_indices(t) for t in (0, 1)])
    assert sorted(epoch.tolist()) == list(range(8))
    assert not torch.equal(dm.batch_indices(0), dm.batch_indices(2))  # a new order next epoch
    parts = []
    for rank in range(2):
        r = small(None, n_samples=8)
        r.trainer = SimpleNamespace(global_rank=rank, world_size=2)  # type: ignore[assignment]
        r.setup()
        parts.append(r.rank_batch(3))
    assert torch.equal(torch.cat(parts), dm.rank_batch(3))
    dm.consumed.count = 3
    resumed = small(None, n_samples=8)
    resumed.load_state_dict(dm.state_dict())
    resumed.setup()
    assert torch.equal(next(iter(resumed.train_dataloader())), dm.rank_batch(3))


def test_pde_fields_reads_a_pt_file_and_subsamples_it(tmp_path: Path) -> None:
    x, y = torch.randn(10, 17, 17), torch.randn(10, 17, 17)
    torch.save({"x": x, "y": y}, tmp_path / "darcy_train_17.pt")
    dm = small(
        None,
        equation="file",
        path=str(tmp_path / "darcy_train_17.pt"),
        field="both",
        resolution=9,
        eval_resolutions=[17],
        val_samples=4,
        normalize="none",
        darcy={},
    )
    assert dm.d_in == 2 and dm.train_grid == (9, 9)
    dm.setup()
    assert_close(dm._train[:, 0], x[:6, ::2, ::2])  # (17 - 1) / (9 - 1) = stride 2
    assert_close(dm.validation_set((17, 17))[0][:, 1], y[6:])
    bad = small(
        None,
        equation="file",
        path=str(tmp_path / "darcy_train_17.pt"),
        resolution=5,
        solution_key="sol",
    )
    with pytest.raises(DatasetFileError, match="has no 'sol'"):
        bad.setup()
    torch.save({"x": x}, tmp_path / "inputs_only.pt")  # field: input needs no solution key
    only = small(
        None, equation="file", path=str(tmp_path / "inputs_only.pt"), field="input", resolution=17
    )
    assert only.d_in == 1 and only.train_grid == (17, 17) and only.dims == 2


def test_pde_fields_config_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="resolution 24 does not divide solve_resolution=64"):
        PDEFieldConfig(resolution=24, eval_resolutions=[64])
    with pytest.raises(ValueError, match="equation: file needs path"):
        PDEFieldConfig(equation="file")


def test_darcy_generation_at_recipe_scale_is_fast_enough_to_test() -> None:
    # A correctness check of the batched path on more samples (timing is measured in the
    # benchmark, not asserted here): generation_batch must not change any sample.
    dm_a = small(None, n_samples=10, generation_batch=3, normalize="none")
    dm_b = small(None, n_samples=10, generation_batch=10, normalize="none")
    dm_a.setup()
    dm_b.setup()
    assert torch.equal(dm_a._train, dm_b._train)


# ---- exact resume through Lightning checkpoints ------------------------------------------------


class Recorder(pl.LightningModule):
    """Records every training batch it sees (a stand-in for an SAE)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch.detach().clone())
        return (self.w * batch.mean()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_function_synthetic() -> pl.LightningDataModule:
    from sae_neural_operator.data.synthetic import (
        FunctionSyntheticConfig,
        FunctionSyntheticDataModule,
    )

    config = FunctionSyntheticConfig(n_atoms=4, grid=16, batch_size=4, val_samples=4)
    return FunctionSyntheticDataModule(config, seed=0)


@pytest.mark.parametrize("kind", ["pde_fields", "function_synthetic"])
def test_resumed_run_sees_the_batches_of_an_unbroken_run(kind: str, tmp_path: Path) -> None:
    def data() -> pl.LightningDataModule:
        return small(None, n_samples=5) if kind == "pde_fields" else make_function_synthetic()

    def trainer(steps: int) -> pl.Trainer:
        return pl.Trainer(
            max_steps=steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            default_root_dir=tmp_path,
            accelerator="cpu",
            enable_checkpointing=False,
        )

    unbroken = Recorder()
    trainer(6).fit(unbroken, datamodule=data())
    first = Recorder()
    t = trainer(3)
    t.fit(first, datamodule=data())
    t.save_checkpoint(tmp_path / "mid.ckpt")
    second = Recorder()
    trainer(6).fit(second, datamodule=data(), ckpt_path=tmp_path / "mid.ckpt")
    resumed = first.seen + second.seen
    assert len(resumed) == len(unbroken.seen) == 6
    for a, b in zip(resumed, unbroken.seen, strict=True):
        assert torch.equal(a, b)


def test_pde_fields_reads_one_validation_file_per_resolution(tmp_path: Path) -> None:
    coarse = {"x": torch.randn(10, 9, 9), "y": torch.randn(10, 9, 9)}
    fine = {"x": torch.randn(3, 17, 17), "y": torch.randn(3, 17, 17)}
    torch.save(coarse, tmp_path / "train_9.pt")
    torch.save(fine, tmp_path / "val_17.pt")
    dm = small(
        None,
        equation="file",
        path=str(tmp_path / "train_9.pt"),
        val_paths={17: str(tmp_path / "val_17.pt")},
        resolution=9,
        eval_resolutions=[17],
        val_samples=4,
        normalize="none",
    )
    dm.setup()
    assert_close(dm.validation_set((17, 17))[0][:, 0], fine["y"])  # its own file, all of it
    assert_close(dm.validation_set((9, 9))[0][:, 0], coarse["y"][6:])  # split off path
    with pytest.raises(ValueError, match=r"val_paths has files for resolutions \[33\]"):
        PDEFieldConfig(equation="file", path="a.pt", val_paths={33: "b.pt"})
    too_coarse = small(
        None, equation="file", path=str(tmp_path / "train_9.pt"), resolution=9,
        eval_resolutions=[17], val_samples=4,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"data\.eval_resolutions: asks for 17 points"):
        too_coarse.setup()
