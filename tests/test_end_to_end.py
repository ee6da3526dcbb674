"""A recipe trained through the CLI produces every promised output, and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sae_lightning import load_sae
from sae_lightning.cli import main
from sae_lightning.recipe import load_recipe
from sae_lightning.runner import build_run, finish, fit

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def small(tmp_path: Path, steps: int = 30, **extra: str) -> list[tuple[str, str]]:
    """Overrides shrinking the quickstart recipe to a few seconds."""
    base = {
        "output_dir": str(tmp_path / "runs"),
        "data.d": "16",
        "data.n_atoms": "64",
        "data.batch_size": "128",
        "data.val_samples": "512",
        "model.d_sae": "64",
        "trainer.max_steps": str(steps),
        "trainer.val_check_interval": "10",
        "trainer.enable_progress_bar": "false",
        "checkpoint.every_n_steps": "10",
    }
    base.update(extra)
    return list(base.items())


def test_fit_writes_logs_checkpoints_metrics_and_export(tmp_path, capsys):
    args = [f"--{k}={v}" for k, v in small(tmp_path)]
    assert main(["fit", "--config", str(RECIPE), *args]) == 0
    out = capsys.readouterr().out
    assert "tensorboard --logdir" in out and "val/mmcs" in out
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("val/fvu", "val/l0", "val/mse", "val/mmcs", "val/recovered_frac", "train/loss"):
        assert key in metrics, key
    assert metrics["val/l0"] == pytest.approx(4.0)
    assert 0 < metrics["val/fvu"] < 1

    events = EventAccumulator(str(run_dir)).Reload()
    tags = set(events.Tags()["scalars"])
    val_keys = {k for k in metrics if k.startswith("val/")}
    assert val_keys <= tags, val_keys - tags
    assert {"train/loss", "train/loss/reconstruction", "train/l0", "lr"} <= tags
    assert "train/dead_fraction_50k_tokens" in tags
    assert "val/feature_density_log10" in events.Tags()["histograms"]

    sae = load_sae(run_dir)
    x = torch.randn(8, 16)
    weights = load_file(str(run_dir / "sae.safetensors"))
    assert set(weights) == set(sae.state_dict())
    assert sae.encode(x).shape == (8, 64)
    assert ((sae.encode(x) != 0).sum(dim=1) <= 4).all()
    torch.testing.assert_close(sae(x), sae.decode(sae.encode(x)))
    config = json.loads((run_dir / "sae_config.json").read_text())
    assert config["sparsity"] == {"name": "topk", "k": 4}
    assert config["plugins"]["sparsity"]["distribution"] == "sae-lightning"


class CrashAt(pl.Callback):
    """Simulates a crash just before the optimizer step ``step`` + 1 runs."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("sparsity", ["topk", "batchtopk", "jumprelu"])
def test_resume_from_last_checkpoint_matches_uninterrupted_run(tmp_path, sparsity):
    over = small(tmp_path, steps=30, **{"model.sparsity.name": sparsity})
    full = load_recipe([RECIPE], [*over, ("name", "full")])
    fit(full)
    crashed = load_recipe([RECIPE], [*over, ("name", "crashed")])
    run = build_run(crashed)
    run.trainer.callbacks.insert(0, CrashAt(20))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run.trainer.fit(run.module, datamodule=run.datamodule)
    fit(crashed, ckpt_path="last")

    a = load_file(str(tmp_path / "runs" / "full" / "version_0" / "sae.safetensors"))
    b = load_file(str(tmp_path / "runs" / "crashed" / "version_0" / "sae.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key}: max diff {(a[key] - b[key]).abs().max()}"


def test_resume_last_without_checkpoint_is_explained(tmp_path, capsys):
    args = [f"--{k}={v}" for k, v in small(tmp_path)]
    code = main(["fit", "--config", str(RECIPE), "--ckpt_path", "last", *args])
    assert code == 2
    assert "--ckpt_path: 'last' found no checkpoints/last.ckpt" in capsys.readouterr().err


def test_validate_subcommand_on_last_checkpoint(tmp_path, capsys):
    recipe = load_recipe([RECIPE], small(tmp_path, steps=10))
    trained = fit(recipe)
    args = [f"--{k}={v}" for k, v in small(tmp_path, steps=10)]
    assert main(["validate", "--config", str(RECIPE), "--ckpt_path", "last", *args]) == 0
    out = capsys.readouterr().out
    assert "val/fvu" in out
    # The checkpoint, not a fresh model, was evaluated.
    assert f"{trained['val/fvu']:.4g}" in out


def test_finish_metrics_cover_reference_metrics(tmp_path):
    run = build_run(load_recipe([RECIPE], small(tmp_path, steps=5)))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    metrics = finish(run)
    assert 0 <= metrics["val/recovered_frac"] <= 1
    assert -1 <= metrics["val/mmcs"] <= 1
