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
import torch
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


def test_template_sparsity_exports_to_saelens_through_its_declared_mapping(
    template_discoverable, tmp_path
):
    """SoftThreshold declares ``ReLU(z - t)`` = SAELens ``standard`` with ``t`` off ``b_enc``."""
    from safetensors.torch import load_file

    from sae_lightning.formats import export_saelens
    from sae_lightning.sae import SparseAutoencoder

    torch.manual_seed(0)
    sae = SparseAutoencoder(
        12, 40, {"name": "linear"}, {"name": "linear"}, {"name": "softthreshold", "threshold": 0.3}
    )
    with torch.no_grad():
        sae.encoder.b_enc.normal_(0, 0.2)
        sae.decoder.b_dec.normal_(0, 0.2)
    export_saelens(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "standard"
    w = {k: v.double() for k, v in load_file(str(tmp_path / "sae_weights.safetensors")).items()}
    x = torch.randn(64, 12, dtype=torch.float64)
    # SAELens's standard SAE, in float64, from the exported tensors alone
    centred = x - w["b_dec"] * cfg["apply_b_dec_to_input"]
    codes = torch.relu(centred @ w["W_enc"] + w["b_enc"])
    ours = sae.double().encode(x)
    assert (ours > 0).any() and (ours == 0).any()
    torch.testing.assert_close(codes, ours, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(codes @ w["W_dec"] + w["b_dec"], sae(x), rtol=1e-6, atol=1e-6)


def test_a_sparsity_without_a_declared_mapping_is_refused(template_discoverable, tmp_path):
    from sae_lightning.formats import UnsupportedArchitectureError, export_saelens
    from sae_lightning.sae import SparseAutoencoder

    sae = SparseAutoencoder(
        12, 40, {"name": "linear"}, {"name": "linear"}, {"name": "softthreshold"}
    )
    sae.sparsity.peer_activation = lambda: None  # as a plugin that declares nothing
    with pytest.raises(UnsupportedArchitectureError, match=r"softthreshold.*no SAELens equivalent"):
        export_saelens(sae, tmp_path)
