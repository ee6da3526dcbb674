"""Several SAEs in one pass over one stream: each ends exactly where it ends when trained alone."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from sae_lightning.callbacks import ReferenceMetrics
from sae_lightning.data.synthetic import SyntheticConfig, SyntheticDataModule
from sae_lightning.errors import ConfigError
from sae_lightning.module import SAEModule
from sae_lightning.multi import MultiSAEModule

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
        callbacks=[ReferenceMetrics()],
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
        # the last step logs, so each SAE's host bound on its dead latents was refreshed there:
        # AuxK's selection is exactly as wide as the latents that are dead
        member = multi.saes[name]
        dead = int((member.tokens_since_fired >= 256).sum())
        assert member.counter_bound.at_most_dead(member.tokens_since_fired, 256) == dead

    for name, spec in SAES.items():
        pl.seed_everything(SEED, verbose=False)
        alone = SAEModule(**kwargs(spec))
        trainer(gradient_clip_val=clip).fit(alone, datamodule=datamodule())
        member = multi.saes[name].state_dict()
        for key, value in alone.state_dict().items():
            assert torch.equal(value, member[key]), f"{name}.{key}"


def test_multi_module_errors_name_the_sae() -> None:
    with pytest.raises(ConfigError, match=r"saes\.a b"):
        MultiSAEModule({"a b": kwargs(SAES["relu"])})
    with pytest.raises(ConfigError, match=r"saes\.x\.model\.sparsity\.k"):
        MultiSAEModule({"x": kwargs({"d_sae": 8, "sparsity": {"name": "topk", "k": 99}})})
    with pytest.raises(ConfigError, match="one input width"):
        MultiSAEModule({"a": kwargs(SAES["relu"]), "b": {**kwargs(SAES["relu"]), "d_in": 8}})
