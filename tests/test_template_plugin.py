"""The template plugin distribution is discovered through its entry point and trains from a recipe.

Nothing is installed globally: a dist-info built from plugins/template/pyproject.toml is put on
sys.path, exactly what pip's install leaves behind (if the template is already installed in this
environment, the same distribution is simply found twice and counted once).
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import pytest
from fake_dists import make_dist

from sae_lightning import load_sae
from sae_lightning.cli import main
from sae_lightning.registry import registry

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "plugins" / "template"


@pytest.fixture
def template_discoverable(tmp_path, monkeypatch):
    meta = tomllib.loads((TEMPLATE / "pyproject.toml").read_text())
    project = meta["project"]
    make_dist(tmp_path, project["name"], project["entry-points"], version=project["version"])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(TEMPLATE))
    registry.refresh()
    yield project
    registry.refresh()
    sys.modules.pop("sae_template_plugin.softthreshold", None)


def test_template_plugin_listed(template_discoverable, capsys):
    assert main(["plugins", "--json"]) == 0
    rows = {(r["group"], r["name"]): r for r in json.loads(capsys.readouterr().out)}
    row = rows[("sparsity", "softthreshold")]
    assert row["dist"] == "sae-template-plugin"
    assert row["error"] is None
    assert set(row["schema"]["properties"]) == {"threshold", "l1_coefficient"}


def test_template_plugin_trains_from_a_recipe(template_discoverable, tmp_path, capsys):
    recipe = tmp_path / "soft.yaml"
    recipe.write_text(
        f"""
name: soft
output_dir: {tmp_path / "runs"}
data: {{name: synthetic, d: 16, n_atoms: 64, batch_size: 128, val_samples: 256}}
model:
  d_sae: 64
  sparsity: {{name: softthreshold, threshold: 0.2, l1_coefficient: 0.001}}
  optimizer: {{lr: 0.01, decay: constant}}
trainer: {{max_steps: 60, val_check_interval: 30, enable_progress_bar: false}}
"""
    )
    assert main(["fit", "--config", str(recipe)]) == 0
    run_dir = tmp_path / "runs" / "soft" / "version_0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/fvu"] < 1.0
    config = json.loads((run_dir / "sae_config.json").read_text())
    assert config["plugins"]["sparsity"]["distribution"] == "sae-template-plugin"
    sae = load_sae(run_dir)
    assert type(sae.sparsity).__name__ == "SoftThreshold"
    assert "train/loss/l1" in metrics


TEMPLATE_RECIPES = sorted((TEMPLATE / "recipes").glob("*.yaml"))


def _train_template_recipe(path: Path, tmp_path: Path, **extra: str) -> Path:
    from sae_lightning.recipe import load_recipe
    from sae_lightning.runner import fit

    overrides = {
        "output_dir": str(tmp_path / "runs"),
        "data.batch_size": "64",
        "trainer.max_steps": "6",
        "trainer.val_check_interval": "6",
        "trainer.enable_progress_bar": "false",
        **extra,
    }
    recipe = load_recipe([path], list(overrides.items()))
    metrics = fit(recipe)
    assert all(v == v and abs(v) != float("inf") for v in metrics.values()), metrics
    return tmp_path / "runs" / recipe.name / "version_0"


@pytest.mark.parametrize("path", TEMPLATE_RECIPES, ids=[p.stem for p in TEMPLATE_RECIPES])
def test_template_recipes_validate(template_discoverable, path) -> None:
    from sae_lightning.recipe import load_recipe

    assert load_recipe([path]).name.startswith("template-")


def test_template_mlp_encoder_trains_on_the_dense_path(template_discoverable, tmp_path) -> None:
    import torch

    run = _train_template_recipe(TEMPLATE / "recipes" / "mlp-encoder.yaml", tmp_path)
    sae = load_sae(run)
    assert type(sae.encoder).__name__ == "MLPEncoder" and sae.encoder.weight() is None
    x = torch.randn(5, sae.d_in)
    expected = sae.encoder.out(torch.relu(sae.encoder.hidden(x)))
    torch.testing.assert_close(sae.encoder(x), expected)


def test_template_scaled_decoder_keeps_unit_directions(template_discoverable, tmp_path) -> None:
    import torch

    run = _train_template_recipe(TEMPLATE / "recipes" / "scaled-decoder.yaml", tmp_path)
    decoder = load_sae(run).decoder
    assert type(decoder).__name__ == "ScaledDecoder"
    norms = decoder.directions.double().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    gains = decoder.log_gain.exp()
    assert not torch.allclose(gains, torch.ones_like(gains)), "the gains were trained"
    torch.testing.assert_close(decoder.atom_norms(), decoder.atoms().norm(dim=1))


def test_template_npy_data_reads_the_file(template_discoverable, tmp_path) -> None:
    import numpy as np
    import torch

    from sae_lightning.registry import registry as reg

    rows = np.random.default_rng(0).standard_normal((1000, 12)).astype(np.float32)
    np.save(tmp_path / "acts.npy", rows)
    spec = {"name": "npy_file", "path": str(tmp_path / "acts.npy"), "val_rows": 100}
    dm = reg.build("datamodules", spec, field="data", seed=3)
    assert dm.d_in == 12
    torch.testing.assert_close(dm.validation_data(), torch.from_numpy(rows[900:]))
    assert torch.equal(dm.rank_batch(4), dm.rank_batch(4))  # batch t is a function of t
    assert not torch.equal(dm.rank_batch(4), dm.rank_batch(5))
    batch = dm.rank_batch(0)
    assert all((torch.from_numpy(rows[:900]) == r).all(dim=1).any() for r in batch[:8])
    run = _train_template_recipe(
        TEMPLATE / "recipes" / "npy-data.yaml",
        tmp_path,
        **{"data.path": str(tmp_path / "acts.npy"), "data.val_rows": "100"},
    )
    assert load_sae(run).d_in == 12
