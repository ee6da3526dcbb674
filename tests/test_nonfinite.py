"""A NaN injected at step k stops the run by the next logging step, naming step k, and the last
checkpoint stays finite."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from sae_lightning.data.validation import BadBatchError, BatchValidator
from sae_lightning.errors import NonFiniteError
from sae_lightning.module import SAEModule
from sae_lightning.recipe import load_recipe
from sae_lightning.runner import build_run

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


class PoisonWeightAt(pl.Callback):
    """Puts a NaN into one encoder weight just before step ``step`` runs."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.sae.encoder.W_enc[0, 0] = float("nan")


def small_recipe(tmp_path, *extra):
    return load_recipe(
        [RECIPE],
        [
            ("output_dir", str(tmp_path)),
            ("data.d", "16"),
            ("data.n_atoms", "64"),
            ("data.batch_size", "64"),
            ("data.val_samples", "256"),
            ("model.d_sae", "32"),
            ("trainer.max_steps", "40"),
            ("trainer.val_check_interval", "40"),
            ("trainer.enable_progress_bar", "false"),
            ("trainer.log_every_n_steps", "10"),
            ("checkpoint.every_n_steps", "5"),
            *extra,
        ],
    )


def poison_data(run, step: int) -> None:
    clean = run.datamodule.generative.batch

    def poisoned(t: int) -> torch.Tensor:
        x = clean(t)
        if t == step:
            x[3, 2] = float("nan")
            x[5, 0] = float("inf")
        return x

    run.datamodule.generative.batch = poisoned


def test_nonfinite_inputs_fail_at_the_door_naming_the_batch(tmp_path):
    run = build_run(small_recipe(tmp_path))
    poison_data(run, 7)
    with pytest.raises(BadBatchError) as info:
        run.trainer.fit(run.module, datamodule=run.datamodule)
    assert "synthetic data: batch 7 has 2 row(s) with NaN/Inf values" in str(info.value)
    assert "data.nonfinite: drop" in str(info.value)
    assert run.trainer.global_step == 7


def test_nonfinite_inputs_dropped_and_counted_when_asked(tmp_path):
    run = build_run(small_recipe(tmp_path, ("data.nonfinite", "drop")))
    poison_data(run, 7)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 40
    assert run.datamodule.validator.dropped_rows == 2
    assert run.datamodule.state_dict()["dropped_rows"] == 2
    assert all(torch.isfinite(p).all() for p in run.module.parameters())


def test_nan_at_step_k_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    k = 13
    recipe = small_recipe(tmp_path)
    run = build_run(recipe)
    run.trainer.callbacks.insert(0, PoisonWeightAt(k))
    with pytest.raises(NonFiniteError) as info:
        run.trainer.fit(run.module, datamodule=run.datamodule)
    message = str(info.value)
    assert f"non-finite loss at step {k} in term(s) reconstruction" in message
    assert "Likely cause: reconstruction: inputs with NaN/Inf" in message
    assert "--ckpt_path last" in message
    # The guard reads its device-side flag on logging steps (every 10) and before every
    # checkpoint (every 5): the step-15 checkpoint is refused, so the run stops there.
    assert k < run.trainer.global_step <= 20

    last = tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 10  # the last multiple of every_n_steps before the NaN
    assert all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
    )
    module = SAEModule.load_from_checkpoint(last, weights_only=True)
    assert torch.isfinite(module.sae(torch.randn(4, 16))).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_validator_catches_every_nonfinite_row_and_passes_sums_that_overflow(dtype):
    big = torch.finfo(dtype).max / 2
    x = torch.full((64, 8), big, dtype=dtype)  # finite values, whose sum overflows
    check = BatchValidator(8, "drop")
    assert check(x, 0) is x and check.dropped_rows == 0
    y = torch.randn(64, 8, dtype=dtype)
    assert check(y, 1) is y
    for bad in (float("nan"), float("inf"), -float("inf")):
        z = torch.randn(64, 8, dtype=dtype)
        z[3, 5] = bad
        z[40, 0] = bad
        kept = check(z, 2)
        assert kept.shape == (62, 8) and torch.isfinite(kept).all()
    assert check.dropped_rows == 6
    with pytest.raises(BadBatchError, match="batch 9 has 1 row"):
        BatchValidator(8)(torch.cat([x[:3], z[3:4]]), 9)
