"""The CLI: bad recipes fail before training with the YAML field named; overrides; print_config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sae_lightning.cli import main, split_overrides

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [
        (["--model.sparsity.name", "topkk"], "model.sparsity.name", "did you mean 'topk'?"),
        (["--model.sparsity.k", "-4"], "model.sparsity.k", "greater than 0"),
        (["--model.sparsity.k", "100000"], "model.sparsity.k", "larger than the dictionary"),
        (["--model.d_in", "31"], "model.d_in", "yields vectors of width 32"),
        (["--model.dd_sae", "5"], "model.dd_sae", "unknown key 'dd_sae'; did you mean 'd_sae'?"),
        (["--trainer.max_stepz", "5"], "trainer.max_stepz", "did you mean 'max_steps'?"),
        (["--data.n_activ", "5"], "data.n_activ", "did you mean 'n_active'?"),
        (["--model.optimizer.lr", "-1"], "model.optimizer.lr", "greater than 0"),
        (["--trainer.logger", "true"], "trainer.logger", "is set by sae-lightning"),
    ],
)
def test_bad_recipe_fails_before_training_naming_the_field(
    capsys, tmp_path, overrides, field, fragment
):
    code, _, err = run_cli(
        capsys, "fit", "--config", str(RECIPE), "--output_dir", str(tmp_path), *overrides
    )
    assert code == 2
    assert err.startswith(f"error: {field}: ")
    assert fragment in err
    assert not any(tmp_path.iterdir()), "nothing may be written before the recipe is valid"


def test_unknown_top_level_key_in_yaml_file(capsys, tmp_path):
    bad = yaml.safe_load(RECIPE.read_text())
    bad["modle"] = {}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    code, _, err = run_cli(capsys, "fit", "--config", str(path))
    assert code == 2
    assert "error: modle: unknown key 'modle'; did you mean 'model'?" in err


def test_yaml_python_tags_are_refused(capsys, tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    code, _, err = run_cli(capsys, "fit", "--config", str(path))
    assert code == 2
    assert "is not valid YAML" in err


def test_print_config_shows_overrides_and_plugin_defaults(capsys):
    code, out, _ = run_cli(
        capsys,
        "fit",
        "--config",
        str(RECIPE),
        "--print_config",
        "--trainer.max_steps",
        "500",
        "--model.sparsity.k",
        "16",
    )
    assert code == 0
    resolved = yaml.safe_load(out)
    assert resolved["trainer"]["max_steps"] == 500
    assert resolved["model"]["sparsity"]["k"] == 16
    assert resolved["model"]["sparsity"]["aux_coefficient"] == pytest.approx(1 / 32)
    assert resolved["data"]["n_atoms"] == 128


def test_switching_plugin_drops_the_old_plugins_parameters(capsys):
    code, out, err = run_cli(
        capsys, "fit", "--config", str(RECIPE), "--print_config", "--model.sparsity.name", "relu"
    )
    assert code == 0, err
    sparsity = yaml.safe_load(out)["model"]["sparsity"]
    assert sparsity["name"] == "relu" and "k" not in sparsity


def test_split_overrides_forms():
    assert split_overrides(["--a.b", "1", "--c=x y"]) == [("a.b", "1"), ("c", "x y")]
    with pytest.raises(ValueError, match="has no value"):
        split_overrides(["--a.b"])


def test_plugins_json_lists_core_plugins_with_schema(capsys):
    code, out, _ = run_cli(capsys, "plugins", "--json")
    assert code == 0
    rows = {(r["group"], r["name"]): r for r in json.loads(out)}
    for group, name in [
        ("encoders", "linear"),
        ("decoders", "linear"),
        ("decoders", "tied"),
        ("sparsity", "relu"),
        ("sparsity", "topk"),
        ("sparsity", "batchtopk"),
        ("sparsity", "jumprelu"),
    ]:
        row = rows[(group, name)]
        assert row["dist"] == "sae-lightning"
        assert row["error"] is None
        assert row["schema"]["type"] == "object"
    assert "k" in rows[("sparsity", "topk")]["schema"]["properties"]


def test_missing_config_is_explained(capsys):
    code, _, err = run_cli(capsys, "fit")
    assert code == 2
    assert "--config: is required" in err
