"""``variants:`` in a recipe: several SAEs trained at once on one stream, through the CLI,
each ending exactly where it ends when trained alone; bad variants name ``variants.N.field``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_lightning import load_sae
from sae_lightning.cli import main
from sae_lightning.errors import ConfigError
from sae_lightning.recipe import load_recipe
from sae_lightning.runner import fit, fit_many, validate

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"

OVERRIDES = {
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
VARIANTS = (
    "[{name: topk_k2, sparsity: {k: 2}}, {name: topk_k8, sparsity: {k: 8}}, "
    "{name: batchtopk_k4, sparsity: {name: batchtopk, k: 4}}]"
)


def test_variants_recipe_through_the_cli_equals_single_runs(tmp_path: Path, capsys) -> None:
    """``variants:`` through ``sae-lightning fit``: 3 SAEs in one pass, each bit-equal to the
    same SAE trained alone with the same seed and data."""
    over = {**OVERRIDES, "output_dir": str(tmp_path / "runs")}
    args = [f"--{k}={v}" for k, v in over.items()]
    assert (
        main(["fit", "--config", str(RECIPE), "--name", "many", "--variants", VARIANTS, *args]) == 0
    )
    run_dir = tmp_path / "runs" / "many" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["topk_k8/val/l0"] == 8
    assert "topk_k2/val/mmcs" in metrics  # the synthetic data's reference metrics, per SAE
    assert "topk_k2/val/mmcs" in capsys.readouterr().out  # the CLI printed the final table

    single_overrides = {
        "topk_k2": [("model.sparsity.k", "2")],
        "topk_k8": [("model.sparsity.k", "8")],
        "batchtopk_k4": [("model.sparsity", "{name: batchtopk, k: 4}")],
    }
    for name, extra in single_overrides.items():
        alone = fit(load_recipe([RECIPE], [*over.items(), ("name", name), *extra]))
        own = json.loads((run_dir / name / "metrics.json").read_text())
        assert own["val/fvu"] == pytest.approx(alone["val/fvu"], abs=1e-6)
        assert own["val/fvu"] == metrics[f"{name}/val/fvu"]
        a = load_file(str(run_dir / name / "sae.safetensors"))
        b = load_file(str(tmp_path / "runs" / name / "version_0" / "sae.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key}"
        assert load_sae(run_dir / name).config_dict()["sparsity"]["k"] == int(name[-1])


def test_fit_many_resumes_from_last(tmp_path: Path) -> None:
    """The Python entry point; a resumed run continues the same variants."""
    over = {**OVERRIDES, "output_dir": str(tmp_path / "runs"), "trainer.max_steps": "10"}
    recipe = load_recipe([RECIPE], [*over.items(), ("name", "many")])
    variants = {"k2": {"sparsity": {"k": 2}}, "wide": {"expansion_factor": 2}}
    first = fit_many(recipe, variants)
    assert set(first) == {"k2", "wide"} and first["k2"]["val/l0"] == 2
    longer = recipe.model_copy(update={"trainer": {**recipe.trainer, "max_steps": 20}})
    second = fit_many(longer, variants, ckpt_path="last")
    assert second["k2"]["val/l0"] == 2 and "val/fvu" in second["wide"]
    run_dir = tmp_path / "runs" / "many" / "version_0"
    assert json.loads((run_dir / "metrics.json").read_text())["trainer/global_step"] == 20
    assert load_sae(run_dir / "wide").config_dict()["d_sae"] == 32  # 2 x d_in 16
    listed = longer.model_copy(update={"variants": [{"name": k, **v} for k, v in variants.items()]})
    checked = validate(listed, "last")  # `sae-lightning validate` of a variants recipe
    assert checked["k2/val/fvu"] == pytest.approx(second["k2"]["val/fvu"], abs=1e-6)


@pytest.mark.parametrize(
    ("variants", "match"),
    [
        ("[{name: a, d_sae: -5}]", r"^variants\.0\.d_sae: "),
        ("[{name: a}, {name: b, sparsity: {k: -1}}]", r"^variants\.1\.sparsity\.k: "),
        ("[{name: c, sparsity: topkk}]", r"^variants\.0\.sparsity\.name: no sparsity plugin"),
        ("[{name: a}, {name: a}]", r"^variants\.1\.name: 'a' names an earlier variant"),
        ("[{name: a b}]", r"^variants\.0\.name: 'a b' is not a valid SAE name"),
        ("[{name: a, optimizer: {lrr: 1}}]", r"^variants\.0\.optimizer\.lrr: unknown key"),
        ("[k8]", r"^variants\.0: Input should be a valid dictionary"),
    ],
)
def test_bad_variants_fail_at_load_naming_the_field(variants: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_recipe([RECIPE], [("variants", variants)])


def test_variant_errors_found_at_build_name_the_field(tmp_path: Path) -> None:
    """Cross-field errors that need the data (k > d_sae, a wrong d_in) are found when the
    modules are built, and still name the variant."""
    over = [("output_dir", str(tmp_path)), ("model.d_sae", "16")]
    recipe = load_recipe([RECIPE], [*over, ("variants", "[{name: a}, {sparsity: {k: 99}}]")])
    with pytest.raises(ConfigError, match=r"^variants\.1\.sparsity\.k: k=99 is larger"):
        fit_many(recipe)
    recipe = load_recipe([RECIPE], [*over, ("variants", "[{name: a, d_in: 8}]")])
    with pytest.raises(ConfigError, match=r"^variants\.0\.d_in: is 8 but"):
        fit_many(recipe)
    with pytest.raises(ConfigError, match=r"^variants: is empty"):
        fit_many(load_recipe([RECIPE]))
    assert not any(tmp_path.iterdir())
