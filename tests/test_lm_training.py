"""Training on LM activations: exact resume mid-epoch (streamed and cached), the KL callback."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from rich.console import Console

pytest.importorskip("transformers")

from lm_scripts.tiny_lm import make_corpus, make_tiny_lm

from sae_lightning.data.activations import ActivationDataModule
from sae_lightning.data.cache import write_cache
from sae_lightning.errors import ConfigError
from sae_lightning.recipe import load_recipe
from sae_lightning.registry import registry
from sae_lightning.runner import build_run, finish


class CrashAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class Recorder(pl.Callback):
    """Every training batch by step, as the module receives it."""

    def __init__(self) -> None:
        self.seen: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen[trainer.global_step] = batch.detach().clone()


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lmtrain")
    return {"model": make_tiny_lm(root / "model"), "text": root / "text", "root": root}


def write_recipe(path: Path, files: dict[str, Path], out: Path, **data) -> Path:
    make_corpus(files["text"])
    recipe = {
        "name": "lm",
        "seed": 3,
        "output_dir": str(out),
        "data": {
            "name": "lm_activations",
            "model": str(files["model"]),
            "hook": "transformer.h.1",
            "text": [str(files["text"])],
            "context_length": 32,
            "batch_size": 64,
            "buffer_size": 256,
            "val_sequences": 2,
            "stats_tokens": 256,
            "normalize": "unit",
            "shard_tokens": 400,
            **data,
        },
        "model": {"d_sae": 64, "sparsity": {"name": "topk", "k": 4}, "optimizer": {"lr": 0.01}},
        "trainer": {
            "max_steps": 16,
            "val_check_interval": 8,
            "accelerator": "cpu",
            "enable_progress_bar": False,
        },
        "checkpoint": {"every_n_steps": 5},
        "callbacks": [{"name": "e2e_kl", "every_n_steps": 8}],
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("mode", ["stream", "cache"])
def test_resumed_run_sees_exactly_the_batches_of_an_unbroken_run(lm_files, tmp_path, mode):
    data = {}
    if mode == "cache":
        data["cache_dir"] = str(tmp_path / "cache")
    path = write_recipe(tmp_path / "r.yaml", lm_files, tmp_path / "runs", **data)
    if mode == "cache":
        recipe = load_recipe([path])
        dm = registry.build("datamodules", recipe.data, field="data", seed=recipe.seed)
        write_cache(dm, Console(quiet=True))

    full = build_run(load_recipe([path], [("name", "full")]))
    full_seen = Recorder()
    full.trainer.callbacks.insert(0, full_seen)
    full.trainer.fit(full.module, datamodule=full.datamodule)
    metrics = finish(full)

    crashed = build_run(load_recipe([path], [("name", "crashed")]))
    crashed.trainer.callbacks.insert(0, CrashAt(10))  # mid-buffer (4 batches each), mid-epoch
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.trainer.fit(crashed.module, datamodule=crashed.datamodule)
    resumed = build_run(load_recipe([path], [("name", "crashed")]), version=0)
    resumed_seen = Recorder()
    resumed.trainer.callbacks.insert(0, resumed_seen)
    ckpt = tmp_path / "runs" / "crashed" / "version_0" / "checkpoints" / "last.ckpt"
    resumed.trainer.fit(resumed.module, datamodule=resumed.datamodule, ckpt_path=str(ckpt))

    assert sorted(resumed_seen.seen) == list(range(10, 16))
    for step, batch in resumed_seen.seen.items():
        assert torch.equal(batch, full_seen.seen[step]), f"step {step} saw other activations"
    a, b = full.module.state_dict(), resumed.module.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.datamodule.scale == full.datamodule.scale != 1.0

    for key in ("ce_clean", "ce_sae", "ce_zero_ablation", "ce_recovered", "kl", "kl_score"):
        assert f"e2e/{key}" in metrics, key
    assert metrics["e2e/kl"] >= 0
    assert metrics["e2e/ce_zero_ablation"] != metrics["e2e/ce_clean"]
    if mode == "stream":
        logged = full.trainer.logged_metrics
        assert "e2e/kl" in logged


def test_kl_callback_needs_language_model_data(tmp_path):
    recipe = load_recipe(
        [],
        [
            ("name", "syn"),
            ("output_dir", str(tmp_path)),
            ("data.name", "synthetic"),
            ("trainer.max_steps", "2"),
            ("trainer.enable_progress_bar", "false"),
            ("data.val_samples", "64"),
            ("data.batch_size", "64"),
            ("callbacks", "[{name: e2e_kl}]"),
        ],
    )
    run = build_run(recipe, log=False)
    with pytest.raises(ConfigError, match=r"callbacks.e2e_kl: needs language-model data"):
        run.trainer.fit(run.module, datamodule=run.datamodule)


def test_lm_recipe_builds_without_loading_the_model(lm_files, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", lm_files, tmp_path / "runs")
    run = build_run(load_recipe([path]), log=False)
    assert isinstance(run.datamodule, ActivationDataModule)
    assert run.module.sae.d_in == 16 and run.datamodule.model is None
