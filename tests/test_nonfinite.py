"""A NaN injected at step k stops the run at step k, and the last checkpoint stays finite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sae_lightning.errors import NonFiniteError
from sae_lightning.module import SAEModule
from sae_lightning.recipe import load_recipe
from sae_lightning.runner import build_run

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def test_nan_at_step_k_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    k = 13
    recipe = load_recipe(
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
            ("checkpoint.every_n_steps", "5"),
        ],
    )
    run = build_run(recipe)
    clean = run.datamodule.generative.batch

    def poisoned(t: int) -> torch.Tensor:
        x = clean(t)
        if t == k:
            x[3, 2] = float("nan")
        return x

    run.datamodule.generative.batch = poisoned
    with pytest.raises(NonFiniteError) as info:
        run.trainer.fit(run.module, datamodule=run.datamodule)
    message = str(info.value)
    assert f"non-finite loss at step {k} in term(s) reconstruction" in message
    assert "--ckpt_path last" in message
    assert run.trainer.global_step == k + 1

    last = tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 10  # the last multiple of every_n_steps before the NaN
    assert all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
    )
    module = SAEModule.load_from_checkpoint(last, weights_only=True)
    assert torch.isfinite(module.sae(torch.randn(4, 16))).all()
