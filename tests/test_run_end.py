"""How a run ends: one final validation, the run folder and the next commands, readable lists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest

from sae_lightning import runner
from sae_lightning.cli import next_steps, plugins_table
from sae_lightning.recipe import load_recipe
from sae_lightning.registry import PluginInfo

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


class CountValidations(pl.Callback):
    def __init__(self) -> None:
        self.count = 0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.count += 0 if trainer.sanity_checking else 1


@pytest.mark.parametrize(("interval", "expected"), [(2, 2), (3, 2)])
def test_the_last_step_is_validated_once(tmp_path, interval: int, expected: int) -> None:
    overrides = {
        "output_dir": str(tmp_path), "data.d": "8", "data.n_atoms": "16",
        "data.batch_size": "32", "data.val_samples": "32", "model.d_sae": "32",
        "trainer.max_steps": "4", "trainer.val_check_interval": str(interval),
        "trainer.enable_progress_bar": "false",
    }  # fmt: skip
    run = runner.build_run(load_recipe([RECIPE], list(overrides.items())))
    counter = CountValidations()
    run.trainer.callbacks.append(counter)
    runner.preflight(run)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    metrics = runner.finish(run)
    # 4 steps every 2: validated at 2 and 4, and the end reuses 4. Every 3: at 3, then the end.
    assert counter.count == expected
    again = run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)[0]
    assert {k: metrics[k] for k in again} == {k: float(v) for k, v in again.items()}


def test_next_steps_are_commands_that_work(tmp_path) -> None:
    text = next_steps(tmp_path / "runs" / "q" / "version_0", tmp_path / "runs")
    lines = text.splitlines()
    assert lines[0] == f"Run folder: {tmp_path / 'runs' / 'q' / 'version_0'}"
    for word in ("load_sae(", " report ", " export ", "--logdir"):
        assert any(word in line for line in lines), word
    tensorboard = next(line for line in lines if "--logdir" in line).split()[1]
    assert Path(tensorboard).name == "tensorboard"
    # Without the venv on PATH, the full path is printed, and it runs.
    done = subprocess.run(
        [sys.executable, "-c", "from sae_lightning.cli import executable; "
         "print(executable('tensorboard'))"],
        capture_output=True, text=True, env={"PATH": "/nonexistent"},
    )  # fmt: skip
    assert Path(done.stdout.strip()).is_absolute() and Path(done.stdout.strip()).is_file()


def test_plugins_table_fits_80_columns() -> None:
    infos = [
        PluginInfo("encoders", "a_rather_long_plugin_name", "some-distribution", "10.2.3",
                   "A description " * 20, None),
        PluginInfo("sparsity", "broken", "dist", "1", "", None, "ImportError: " + "x " * 60),
    ]  # fmt: skip
    text = plugins_table(infos, 80)
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "a_rather_long_plugin_name" in text and "some-distribution 10.2.3" in text
    assert "BROKEN" in text and text.count("x") >= 60  # the whole error, wrapped
    wide = plugins_table(infos[:1], 200).splitlines()
    assert len(wide) == 2  # the group, then one line per plugin when it fits
