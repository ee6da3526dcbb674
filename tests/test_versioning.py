"""Checkpoints from other plugin versions are refused clearly or migrated by a versioned hook."""

from __future__ import annotations

import pytest
import torch

from sae_lightning.components.base import Plugin
from sae_lightning.versioning import IncompatibleCheckpointError, migrate_checkpoint


class OldLayout(Plugin):
    """A plugin whose state version 2 renamed 'w' to 'weight' and doubled it."""

    state_version = 2

    @classmethod
    def migrate_state(cls, state, from_version):
        assert from_version == 1
        return {"weight": state["w"] * 2, **{k: v for k, v in state.items() if k != "w"}}


class NoHook(Plugin):
    state_version = 2


def current(state_version: int = 2, name: str = "topk", dist: str = "sae-lightning"):
    return {
        "sparsity": {
            "name": name,
            "distribution": dist,
            "version": "0.2.0",
            "state_version": state_version,
        }
    }


def checkpoint(state_version: int = 1, name: str = "topk"):
    return {
        "state_dict": {
            "sae.sparsity.w": torch.ones(3),
            "sae.sparsity.b": torch.zeros(2),
            "sae.encoder.W": torch.ones(1),
        },
        "sae_lightning": {
            "plugins": {
                "sparsity": {
                    "name": name,
                    "distribution": "sae-lightning",
                    "version": "0.1.0",
                    "state_version": state_version,
                }
            }
        },
    }


def test_older_state_is_migrated_by_the_plugins_hook():
    ckpt = checkpoint()
    migrate_checkpoint(ckpt, current(), {"sparsity": OldLayout()})
    state = ckpt["state_dict"]
    assert set(state) == {"sae.sparsity.weight", "sae.sparsity.b", "sae.encoder.W"}
    assert torch.equal(state["sae.sparsity.weight"], torch.full((3,), 2.0))
    assert ckpt["sae_lightning"]["plugins"]["sparsity"]["state_version"] == 2


def test_older_state_without_hook_is_refused_naming_versions():
    with pytest.raises(IncompatibleCheckpointError) as info:
        migrate_checkpoint(checkpoint(), current(), {"sparsity": NoHook()})
    msg = str(info.value)
    assert "sparsity plugin 'topk' from sae-lightning 0.1.0 (state version 1)" in msg
    assert "no migrate_state hook" in msg and "sae-lightning==0.1.0" in msg


def test_newer_state_and_other_plugin_are_refused():
    with pytest.raises(IncompatibleCheckpointError, match=r"newer than the installed 0\.2\.0"):
        migrate_checkpoint(checkpoint(state_version=3), current(), {"sparsity": OldLayout()})
    with pytest.raises(
        IncompatibleCheckpointError, match="but the recipe builds sparsity plugin 'relu'"
    ):
        migrate_checkpoint(checkpoint(), current(name="relu"), {"sparsity": OldLayout()})


def test_same_state_version_loads_unchanged_across_package_versions():
    ckpt = checkpoint(state_version=2)
    before = dict(ckpt["state_dict"])
    migrate_checkpoint(ckpt, current(), {"sparsity": NoHook()})
    assert ckpt["state_dict"] == before


def test_real_checkpoint_from_an_older_plugin_state_is_refused_on_load(tmp_path, monkeypatch):
    from pathlib import Path

    from sae_lightning.components.sparsity.topk import TopK
    from sae_lightning.module import SAEModule
    from sae_lightning.recipe import load_recipe
    from sae_lightning.runner import fit

    recipe_file = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    overrides = [
        ("output_dir", str(tmp_path)),
        ("data.d", "8"),
        ("data.n_atoms", "32"),
        ("data.batch_size", "32"),
        ("data.val_samples", "64"),
        ("model.d_sae", "16"),
        ("trainer.max_steps", "4"),
        ("trainer.val_check_interval", "4"),
        ("trainer.enable_progress_bar", "false"),
        ("checkpoint.every_n_steps", "2"),
    ]
    fit(load_recipe([recipe_file], overrides))
    last = tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    assert SAEModule.load_from_checkpoint(last, weights_only=True) is not None
    monkeypatch.setattr(TopK, "state_version", 2)
    with pytest.raises(IncompatibleCheckpointError, match="no migrate_state hook"):
        SAEModule.load_from_checkpoint(last, weights_only=True)
