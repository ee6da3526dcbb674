"""The default training precision: bf16 autocast on CUDA (fp32 master weights), fp32 on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sae_lightning.precision import CUDA_DEFAULT, with_default_precision
from sae_lightning.recipe import load_recipe
from sae_lightning.runner import build_run

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def fake_cuda(monkeypatch, *, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


@pytest.mark.parametrize("accelerator", ["auto", "gpu", "cuda"])
def test_cuda_runs_default_to_bf16_autocast(monkeypatch, accelerator: str) -> None:
    fake_cuda(monkeypatch)
    args = with_default_precision({"accelerator": accelerator, "max_steps": 5})
    assert args == {"accelerator": accelerator, "max_steps": 5, "precision": CUDA_DEFAULT}


def test_the_recipe_precision_wins_and_cpu_runs_stay_fp32(monkeypatch) -> None:
    fake_cuda(monkeypatch)
    assert with_default_precision({"precision": "32-true"}) == {"precision": "32-true"}
    assert with_default_precision({"accelerator": "cpu"}) == {"accelerator": "cpu"}
    fake_cuda(monkeypatch, bf16=False)
    assert with_default_precision({"accelerator": "auto"}) == {"accelerator": "auto"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert with_default_precision({"accelerator": "auto"}) == {"accelerator": "auto"}


def recipe(tmp_path, *extra):
    return load_recipe(
        [RECIPE],
        [
            ("output_dir", str(tmp_path)),
            ("data.d", "16"),
            ("data.n_atoms", "64"),
            ("data.batch_size", "128"),
            ("data.val_samples", "128"),
            ("model.d_sae", "64"),
            ("model.optimizer.warmup_steps", "1"),
            ("trainer.max_steps", "20"),
            ("trainer.val_check_interval", "20"),
            ("trainer.enable_progress_bar", "false"),
            *extra,
        ],
    )


def test_cpu_default_is_fp32(tmp_path) -> None:
    assert build_run(recipe(tmp_path)).trainer.precision == "32-true"


@pytest.mark.parametrize("sparsity", ["{name: topk, k: 4}", "{name: batchtopk, k: 4}"])
def test_bf16_autocast_trains_with_fp32_master_weights(tmp_path, sparsity: str) -> None:
    """The CUDA default's autocast, run on the CPU: the step's kernels accept bf16 activations,
    and the weights the optimizer updates stay float32."""
    run = build_run(
        recipe(tmp_path, ("model.sparsity", sparsity), ("trainer.precision", "bf16-mixed"))
    )
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 20
    assert {p.dtype for p in run.module.parameters()} == {torch.float32}
    assert all(torch.isfinite(p).all() for p in run.module.parameters())
    fvu = float(run.trainer.callback_metrics["val/fvu"])
    assert fvu < 0.9, fvu  # it learned under autocast (an untrained SAE is at 1)
