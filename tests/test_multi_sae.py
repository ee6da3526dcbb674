"""Several SAEs in one pass over one stream: each ends exactly where it ends when trained alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file

from sae_lightning import load_sae
from sae_lightning.data.synthetic import SyntheticConfig, SyntheticDataModule
from sae_lightning.errors import ConfigError
from sae_lightning.module import SAEModule
from sae_lightning.multi import MultiSAEModule, fit_many
from sae_lightning.recipe import load_recipe
from sae_lightning.runner import fit

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
SEED, STEPS = 7, 15

SAES: dict[str, dict[str, Any]] = {
    "topk_k2": {"d_sae": 32, "sparsity": {"name": "topk", "k": 2}, "optimizer": {"lr": 1e-2}},
    "batchtopk_k3": {"d_sae": 48, "sparsity": {"name": "batchtopk", "k": 3}},
    "relu": {
        "d_sae": 32,
        "decoder": {"name": "tied"},
        "sparsity": {"name": "relu", "l1_coefficient": 1e-3},
        "optimizer": {"lr": 3e-3, "weight_decay": 0.01},
    },
}


def kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "d_in": 16,
        "encoder": {"name": "linear"},
        "decoder": {"name": "linear"},
        "loss": {"dead_window_tokens": 256},
        **spec,
    }


def datamodule() -> SyntheticDataModule:
    cfg = SyntheticConfig(d=16, n_atoms=64, n_active=3, batch_size=64, val_samples=128)
    return SyntheticDataModule(cfg, seed=SEED)


def trainer(**extra: Any) -> pl.Trainer:
    return pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=STEPS,
        num_sanity_val_steps=0,
        **extra,
    )


@pytest.mark.parametrize("clip", [None, 0.05])
def test_each_sae_equals_training_it_alone(clip: float | None) -> None:
    multi = MultiSAEModule({name: kwargs(spec) for name, spec in SAES.items()}, seed=SEED)
    t = trainer(gradient_clip_val=clip)
    t.fit(multi, datamodule=datamodule())
    for name in SAES:  # each logs under its own prefix
        assert f"{name}/train/loss" in t.callback_metrics
        assert f"{name}/val/fvu" in t.callback_metrics
        assert f"{name}/val/mmcs" in t.callback_metrics

    for name, spec in SAES.items():
        pl.seed_everything(SEED, verbose=False)
        alone = SAEModule(**kwargs(spec))
        trainer(gradient_clip_val=clip).fit(alone, datamodule=datamodule())
        member = multi.saes[name].state_dict()
        for key, value in alone.state_dict().items():
            assert torch.equal(value, member[key]), f"{name}.{key}"


def test_recipe_variants_equal_their_single_runs(tmp_path: Path) -> None:
    over = {
        "output_dir": str(tmp_path / "runs"),
        "data.d": "16",
        "data.n_atoms": "64",
        "data.batch_size": "128",
        "data.val_samples": "256",
        "model.d_sae": "64",
        "trainer.max_steps": "20",
        "trainer.val_check_interval": "10",
        "trainer.enable_progress_bar": "false",
        "checkpoint.every_n_steps": "10",
    }
    variants = {
        "topk_k2": {"sparsity": {"k": 2}},
        "topk_k8": {"sparsity": {"k": 8}},
        "batchtopk_k4": {"sparsity": {"name": "batchtopk", "k": 4}},
    }
    many = fit_many(load_recipe([RECIPE], [*over.items(), ("name", "many")]), variants)
    run_dir = tmp_path / "runs" / "many" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["topk_k8/val/l0"] == 8

    single_overrides = {
        "topk_k2": [("model.sparsity.k", "2")],
        "topk_k8": [("model.sparsity.k", "8")],
        "batchtopk_k4": [("model.sparsity", "{name: batchtopk, k: 4}")],
    }
    for name, extra in single_overrides.items():
        alone = fit(load_recipe([RECIPE], [*over.items(), ("name", name), *extra]))
        assert many[name]["val/fvu"] == pytest.approx(alone["val/fvu"], abs=1e-6)
        assert json.loads((run_dir / name / "metrics.json").read_text()) == many[name]
        a = load_file(str(run_dir / name / "sae.safetensors"))
        b = load_file(str(tmp_path / "runs" / name / "version_0" / "sae.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key}"
        assert load_sae(run_dir / name).config_dict()["sparsity"]["k"] == int(name[-1])


def test_bad_variants_name_the_field() -> None:
    recipe = load_recipe([RECIPE])
    with pytest.raises(ConfigError, match=r"^variants\.a\.d_sae: "):
        fit_many(recipe, {"a": {"d_sae": -5}})
    with pytest.raises(ConfigError, match=r"^variants\.b\.sparsity\.k: "):
        fit_many(recipe, {"a": {}, "b": {"sparsity": {"k": -1}}})
    with pytest.raises(ConfigError, match=r"^variants\.c\.sparsity\.name: no sparsity plugin"):
        fit_many(recipe, {"c": {"sparsity": "topkk"}})
    with pytest.raises(ConfigError, match=r"saes\.a b"):
        MultiSAEModule({"a b": kwargs(SAES["relu"])})
    with pytest.raises(ConfigError, match=r"saes\.x\.model\.sparsity\.k"):
        MultiSAEModule({"x": kwargs({"d_sae": 8, "sparsity": {"name": "topk", "k": 99}})})
    with pytest.raises(ConfigError, match="one input width"):
        MultiSAEModule({"a": kwargs(SAES["relu"]), "b": {**kwargs(SAES["relu"]), "d_in": 8}})
