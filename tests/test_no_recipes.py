"""The neural-operator recipes parse, validate and train through the runner.

Each recipe is loaded as `sae-lightning fit --config recipes/X.yaml` loads it, with command-line
style overrides that shrink it (2 steps, small batches, few validation samples) and send its
outputs to a temporary folder; then `runner.fit` trains it, validates it (the recipe's own
callbacks included) and writes `metrics.json`. The FNO-activations recipe needs a trained FNO:
a tiny one is trained here with the functions behind `sae-no-train-fno`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from sae_neural_operator.data.darcy import DarcyConfig
from sae_neural_operator.fno_model import FNOConfig
from sae_neural_operator.train_fno import TrainSettings
from sae_neural_operator.train_fno import run as train_fno

from sae_lightning.recipe import load_recipe
from sae_lightning.runner import fit, resolved_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SHRINK = {
    "trainer.max_steps": "2",
    "trainer.val_check_interval": "2",
    "trainer.enable_progress_bar": "false",
    "checkpoint.every_n_steps": "2",
}
SYNTHETIC = {"data.batch_size": "4", "data.val_samples": "4", "data.val_batch_size": "4"}
DARCY = {
    "data.n_samples": "4",
    "data.val_samples": "2",
    "data.batch_size": "2",
    "data.generation_batch": "2",
    "data.cache_dir": "null",
}
ACTIVATIONS = {"data.batch_size": "2", "data.val_samples": "2", "data.val_batch_size": "2"}
CASES = {  # recipe: (overrides, its training grid in points per axis)
    "function-recovery-sae-fno.yaml": (SYNTHETIC, 64),
    "function-recovery-sae-cnn.yaml": (SYNTHETIC, 64),
    "function-recovery-lifted.yaml": (SYNTHETIC, 64),
    "darcy-sae-fno.yaml": (DARCY, 32),
    "fno-activations-sae-fno.yaml": (ACTIVATIONS, 16),  # the tiny FNO's resolution
}


@pytest.fixture(scope="module")
def tiny_fno(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch FNO on 8 Darcy samples at 16 x 16, saved as `sae-no-train-fno` saves one."""
    out = tmp_path_factory.mktemp("fno")
    model = FNOConfig(width=4, modes=4, n_layers=2, projection=8)
    settings = TrainSettings(resolution=16, train_samples=8, test_samples=2, epochs=2)
    train_fno(out, model, settings, DarcyConfig(modes=8), progress=False)
    return out


def shrunk(name: str, tmp_path: Path, fno_path: Path | None) -> list[tuple[str, str]]:
    overrides = {**SHRINK, **CASES[name][0], "output_dir": str(tmp_path / "runs")}
    if fno_path is not None:
        overrides["data.fno_path"] = str(fno_path)
    return list(overrides.items())


@pytest.mark.parametrize("name", sorted(CASES))
def test_recipe_parses_validates_and_trains(
    name: str, tmp_path: Path, tiny_fno: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths in the recipe stay inside the test folder
    path = RECIPES / name
    full = resolved_recipe(load_recipe([path]))  # the recipe as written: every plugin valid
    assert full.trainer["max_steps"] > 2 and full.trainer["accelerator"] == "cpu"
    callbacks = {spec["name"] for spec in full.callbacks}
    assert {"resolution_transfer", "concept_images"} <= callbacks

    fno = tiny_fno if full.data["name"] == "fno_activations" else None
    recipe = load_recipe([path], shrunk(name, tmp_path, fno))
    metrics = fit(recipe)

    assert metrics["trainer/global_step"] == 2
    run_dir = tmp_path / "runs" / recipe.name / "version_0"
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written["val/rel_l2"] == pytest.approx(metrics["val/rel_l2"])
    transfer = {key: v for key, v in written.items() if key.startswith("val/rel_l2@")}
    assert all(math.isfinite(v) and v >= 0 for v in transfer.values()), transfer
    # At the training grid the callback sees the validation samples the core scored.
    at_train_grid = f"val/rel_l2@{CASES[name][1]}"
    assert transfer[at_train_grid] == pytest.approx(written["val/rel_l2"], rel=1e-4)
