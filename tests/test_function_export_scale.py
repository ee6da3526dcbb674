"""A function-space SAE trained on per-channel normalised fields exports an SAE of raw fields.

``pde_fields`` with ``normalize: unit`` multiplies each channel by its own factor. Those factors
cannot be folded into a spectral encoder the way a scalar is folded into ``W_enc``, so the
export records them and the SAE applies them itself: the loaded SAE, given raw fields (those of
the same recipe with ``normalize: none``), reconstructs them as well as the trained SAE
reconstructed the normalised ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_lightning import load_sae
from sae_lightning.functional import relative_l2
from sae_lightning.inspect.functions import scan
from sae_lightning.inspect.options import InspectOptions
from sae_lightning.module import as_tensor
from sae_lightning.recipe import load_recipe
from sae_lightning.registry import registry
from sae_lightning.runner import fit
from sae_lightning.sae import SparseAutoencoder

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "darcy-sae-fno.yaml"
SMALL = {
    "data.n_samples": "8",
    "data.val_samples": "4",
    "data.batch_size": "4",
    "data.generation_batch": "4",
    "data.cache_dir": "null",
    "data.eval_resolutions": "[]",
    "data.solve_resolution": "32",
    "trainer.max_steps": "20",
    "trainer.val_check_interval": "20",
    "trainer.enable_progress_bar": "false",
    "checkpoint.every_n_steps": "20",
    "callbacks": "[]",
}


def validation_fields(recipe_data: dict, normalize: str) -> torch.Tensor:
    """The recipe's validation fields at the training grid, normalised as asked."""
    dm = registry.build(
        "datamodules", {**recipe_data, "normalize": normalize}, field="data", seed=0
    )
    dm.prepare_data()
    dm.setup("validate")
    return torch.cat([as_tensor(b) for b in dm.val_dataloader()])


def test_export_takes_raw_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    overrides = [*SMALL.items(), ("output_dir", str(tmp_path / "runs"))]
    recipe = load_recipe([RECIPE], overrides)
    metrics = fit(recipe)
    run_dir = tmp_path / "runs" / recipe.name / "version_0"

    raw = validation_fields(recipe.data, "none")
    normalised = validation_fields(recipe.data, "unit")
    scale = (normalised.pow(2).sum() / raw.pow(2).sum()).sqrt()  # one channel: one factor
    assert abs(float(scale) - 1.0) > 0.1, "the test needs fields whose scale is not 1"

    config = json.loads((run_dir / "sae_config.json").read_text())
    assert config["input_scale"] == pytest.approx([float(scale)], rel=1e-5)
    sae = load_sae(run_dir)
    assert isinstance(sae, SparseAutoencoder) and sae.input_scale is not None

    # inspect reads the normalised validation fields and feeds the SAE raw ones: its statistics
    # are those of the trained SAE on the normalised fields
    dm = registry.build("datamodules", recipe.data, field="data", seed=recipe.seed)
    dm.prepare_data()
    options = InspectOptions(tokens=4, n_top=2)
    stats, top = scan(sae, dm, options)
    trained = load_sae(run_dir)
    trained.set_input_scale(None)
    stats_trained, top_trained = scan(trained, dm, options)
    torch.testing.assert_close(stats.mean, stats_trained.mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(top.values, top_trained.values, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(top.fields * float(scale), top_trained.fields, rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        on_raw = relative_l2(raw, sae(raw)).mean()
        # the reported metric is that of the trained SAE on the normalised fields
        assert float(on_raw) == pytest.approx(metrics["val/rel_l2"], rel=1e-4)
        # the same SAE without the recorded factors is a different (worse) map of raw fields
        sae.set_input_scale(None)
        unscaled = relative_l2(raw, sae(raw)).mean()
    assert abs(float(unscaled) - float(on_raw)) > 1e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_input_scale_is_the_trained_map_in_raw_units(seed: int) -> None:
    """``sae(x) == sae_trained(s x) / s`` per channel, in float64, codes unchanged."""
    torch.manual_seed(seed)
    spec = ({"name": "fno", "modes": [4]}, {"name": "fno"}, {"name": "joint_topk", "k": 2})
    sae = SparseAutoencoder(3, 8, *spec).double()
    x = torch.randn(5, 3, 16, dtype=torch.float64)
    s = torch.rand(3, dtype=torch.float64) + 0.5
    with torch.no_grad():
        trained_codes = sae.encode(x * s.view(3, 1))
        expected = sae(x * s.view(3, 1)) / s.view(3, 1)
        sae.set_input_scale(s)
        torch.testing.assert_close(sae(x), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sae.encode(x), trained_codes, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sae.run(x).x_hat, expected, rtol=1e-12, atol=1e-12)
    assert sae.config_dict()["input_scale"] == pytest.approx(s.tolist())
    with pytest.raises(ValueError, match="input_scale has shape"):
        sae.set_input_scale(torch.ones(2))
