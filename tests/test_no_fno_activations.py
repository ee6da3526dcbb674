"""The project's FNO, `sae-no-train-fno`, and the hooked-activation DataModule."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from sae_neural_operator.activations import record
from sae_neural_operator.data.darcy import Darcy, DarcyConfig
from sae_neural_operator.fno_model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    FNO2d,
    FNOConfig,
    load_fno,
    save_fno,
)
from sae_neural_operator.train_fno import _TEST, darcy_samples, main, subsample

from sae_lightning.errors import ConfigError
from sae_lightning.registry import registry

TINY = FNOConfig(width=6, modes=4, n_layers=2, projection=8)


def test_fno_runs_at_two_resolutions_and_refuses_too_coarse_grids():
    torch.manual_seed(0)
    model = FNO2d(TINY)
    for n in (8, 16):
        out = model(torch.rand(3, 1, n, n))
        assert out.shape == (3, 1, n, n) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="at least 2\\*4 = 8 points"):
        model(torch.rand(1, 1, 6, 6))


def test_blocks_compute_act_of_pointwise_plus_spectral_in_float64():
    """``v <- gelu(W v + K v)`` per block, against a reference built from the layers' parts."""
    torch.manual_seed(1)
    model = FNO2d(TINY).double()
    a = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    v = model.lift(a)
    for block in model.blocks:
        w = torch.einsum("oi,bihw->bohw", block.pointwise.weight[:, :, 0, 0], v)
        w = w + block.pointwise.bias.view(1, -1, 1, 1)
        v = torch.nn.functional.gelu(w + block.spectral(v))
    ref = model.projection(v) * model.out_std + model.out_mean
    torch.testing.assert_close(model(a), ref)


def test_train_fno_end_to_end_writes_loadable_files(tmp_path, capsys):
    out = tmp_path / "fno"
    argv = ["--out", str(out), "--resolution", "16", "--train-samples", "8"]
    argv += ["--test-samples", "4", "--epochs", "2", "--batch-size", "4", "--width", "6"]
    argv += ["--modes", "4", "--layers", "2", "--projection", "8", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "test relative L2 at 16x16" in printed and "at 32x32 (zero-shot" in printed
    assert (out / WEIGHTS_FILE).is_file() and (out / CONFIG_FILE).is_file()
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries
    record_ = json.loads((out / CONFIG_FILE).read_text())
    assert record_["model"]["width"] == 6 and record_["training"]["resolution"] == 16

    # The loaded weights (and normalisation) reproduce the test errors measured in training.
    model = load_fno(out)
    darcy = Darcy(DarcyConfig.model_validate(record_["darcy"]))
    a, u = darcy_samples(darcy, 4, 32, 0, _TEST)
    for grid, (aa, uu) in ((16, (subsample(a, 2), subsample(u, 2))), (32, (a, u))):
        with torch.no_grad():
            pred = model(aa).double()
        err = (uu.double() - pred).flatten(1).norm(dim=1) / uu.double().flatten(1).norm(dim=1)
        assert float(err.mean()) == pytest.approx(record_["results"][f"test_rel_l2@{grid}"], 1e-5)


def test_train_fno_rejects_resolution_below_twice_the_modes(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--resolution", "8", "--modes", "6", "--no-progress"]
    assert main(argv) == 2
    assert "--resolution 8 is below 2 x --modes (6)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def saved_fno(tmp_path_factory):
    """A random tiny FNO saved like `sae-no-train-fno` saves one (training is not needed)."""
    torch.manual_seed(2)
    model = FNO2d(TINY)
    model.set_normalization(torch.rand(8, 1, 8, 8) * 9 + 3, torch.rand(8, 1, 8, 8) * 0.01)
    darcy = DarcyConfig(modes=6).model_dump(mode="json")
    path = tmp_path_factory.mktemp("fno")
    save_fno(model, path, extra={"darcy": darcy, "training": {"resolution": 12}})
    return path


def build(path, **params):
    spec = {"name": "fno_activations", "fno_path": str(path), "batch_size": 4, **params}
    spec.setdefault("val_samples", 6)
    return registry.build("datamodules", spec, field="data", seed=3)


def test_activations_equal_a_direct_forward_to_the_hooked_block(saved_fno):
    dm = build(saved_fno, hook="blocks.1")
    assert dm.d_in == TINY.width and dm.train_grid == (12, 12)  # resolution from the record
    a = dm.batch_inputs(0)
    assert a.shape == (4, 1, 12, 12)
    assert set(a.unique().tolist()) <= {3.0, 12.0}  # piecewise-constant Darcy permeability
    model = load_fno(saved_fno)
    v = model.blocks[1](model.blocks[0](model.lift(a)))  # direct forward to blocks.1
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, TINY.width, 12, 12)
    torch.testing.assert_close(batch, v)
    torch.testing.assert_close(record(model, "blocks.0", 0, a), model.blocks[0](model.lift(a)))


def test_resolution_and_validation_set_at_other_grids(saved_fno):
    dm = build(saved_fno, hook="blocks.0", resolution=16)
    dm.setup("fit")
    val = torch.cat([b[0] for b in dm.val_dataloader()])
    assert val.shape == (6, TINY.width, 16, 16)
    torch.testing.assert_close(dm.validation_set((16, 16))[0], val)
    fine, support = dm.validation_set((32, 32))
    assert fine.shape == (6, TINY.width, 32, 32) and support is None
    # the same inputs, sampled finer: the permeability at 32 subsampled is the one at 16
    model = load_fno(saved_fno)
    a16 = dm.darcy.coefficient(dm._validation_noise(), 16)[:, None, :16, :16].float()
    torch.testing.assert_close(val, model.blocks[0](model.lift(a16)))
    with pytest.raises(ValueError, match="at least 2\\*4"):
        dm.validation_set((6, 6))


def test_resume_continues_at_the_consumed_batch(saved_fno):
    dm = build(saved_fno)
    stream = iter(dm.train_dataloader())
    batches = [next(stream) for _ in range(3)]
    assert not torch.equal(batches[1], batches[2])
    resumed = build(saved_fno)
    resumed.load_state_dict({**dm.state_dict(), "batches_consumed": 2})
    torch.testing.assert_close(next(iter(resumed.train_dataloader())), batches[2], rtol=0, atol=0)


def test_lightning_counts_consumed_batches_into_the_checkpoint_state(saved_fno, tmp_path):
    import lightning.pytorch as pl

    from sae_lightning.module import SAEModule

    dm = build(saved_fno)
    module = SAEModule(
        d_in=dm.d_in,
        d_sae=4,
        encoder={"name": "fno", "modes": [3, 3]},
        decoder={"name": "fno"},
        sparsity={"name": "relu", "l1_coefficient": 1e-3},
        loss={"reconstruction": "rel_l2"},
    )
    trainer = pl.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    assert dm.state_dict()["batches_consumed"] == 3


def test_config_errors_name_the_field(saved_fno, tmp_path):
    if importlib.util.find_spec("neuralop") is None:  # the optional backend is absent here
        with pytest.raises(ConfigError, match=r"data\.backend: is 'neuralop' but the neuralop"):
            build(saved_fno, backend="neuralop")
    with pytest.raises(ConfigError, match=r"data\.hook: no module of FNO2d matches 'block.9'"):
        build(saved_fno, hook="block.9")
    with pytest.raises(ConfigError, match=r"data\.fno_path: .*sae-no-train-fno"):
        build(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"data\.hook: 'blocks\.\*' matches 2 modules"):
        build(saved_fno, hook="blocks.*")
    with pytest.raises(ConfigError, match=r"data\.hook_call: module 'blocks\.1' ran 1 time"):
        build(saved_fno, hook_call=1)
    with pytest.raises(ConfigError, match=r"data\.resolution: is 6: SpectralConv"):
        build(saved_fno, resolution=6)
