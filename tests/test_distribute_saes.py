"""``trainer.distribute_saes``: the SAEs of a 3-variant recipe spread over 2 CPU processes
(gloo) end bit-identical to one process training all three, each process holds only its own,
and a run resumed from its first checkpoint ends where the unbroken run ends.

Lightning's launcher re-executes ``sys.argv``, so the 2-process runs are a script in
``tests/mp_scripts`` started as a subprocess; the one-process reference runs here.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_lightning.errors import ConfigError
from sae_lightning.parallel.strategy import check_model_parallel
from sae_lightning.recipe import load_recipe
from sae_lightning.runner import build_run, fit

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
NAMES = ("topk_k4", "batchtopk_k4", "relu")
OWNERS = {"topk_k4": 0, "batchtopk_k4": 1, "relu": 0}  # SAE i on process i mod 2

distribute = importlib.import_module("mp_scripts.distribute")


def run_folder(out: Path) -> Path:
    return out / "quickstart" / "version_0"


@pytest.fixture(scope="module")
def spread(tmp_path_factory) -> Path:
    """The 2-process runs: ``run`` (unbroken), ``resumed`` and ``rank<r>.json``."""
    out = tmp_path_factory.mktemp("spread")
    cmd = [sys.executable, str(ROOT / "tests" / "mp_scripts" / "distribute.py"), str(out), "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    """The same recipe on one process: a MultiSAEModule holding all three SAEs."""
    out = tmp_path_factory.mktemp("one")
    fit(distribute.recipe(out, 1, False))
    return run_folder(out)


def test_each_sae_equals_one_process_training_all(spread: Path, one: Path) -> None:
    for name in NAMES:
        got = load_file(run_folder(spread / "run") / name / "sae.safetensors")
        want = load_file(one / name / "sae.safetensors")
        assert got.keys() == want.keys()
        for key in want:  # the same kernels on the same batches, in the same order
            assert torch.equal(got[key], want[key]), f"{name}.{key}"


def test_every_sae_is_logged_and_resampled_as_in_one_process(spread: Path, one: Path) -> None:
    got = json.loads((run_folder(spread / "run") / "metrics.json").read_text())
    want = json.loads((one / "metrics.json").read_text())
    for name in NAMES:
        keys = [k for k in want if k.startswith(f"{name}/")]
        assert f"{name}/val/fvu" in keys and f"{name}/train/loss" in keys
        assert f"{name}/train/resampled" in keys  # logged from the process that holds it
        for key in keys:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key
    own = json.loads((run_folder(spread / "run") / "relu" / "metrics.json").read_text())
    assert own["val/fvu"] == got["relu/val/fvu"]  # each SAE's own metrics.json


def test_each_process_holds_only_its_own_saes(spread: Path) -> None:
    module = build_run(distribute.recipe(ROOT / "unused", 1, False), log=False).module
    sizes = {
        name: sum(p.numel() * p.element_size() for p in module.saes[name].parameters())
        for name in NAMES
    }
    for rank in (0, 1):
        held = json.loads((spread / f"rank{rank}.json").read_text())
        mine = [name for name in NAMES if OWNERS[name] == rank]
        assert held["saes"] == mine
        assert all(p.split(".")[1] in mine for p in held["parameters"])
        assert held["bytes"] == sum(sizes[name] for name in mine)
        assert held["optimizer_bytes"] == 2 * held["bytes"]  # Adam's two moments, no more


def test_resumed_from_the_first_checkpoint_ends_bit_identical(spread: Path) -> None:
    for name in NAMES:
        got = load_file(run_folder(spread / "resumed") / name / "sae.safetensors")
        want = load_file(run_folder(spread / "run") / name / "sae.safetensors")
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}.{key}"


QUICK = str(ROOT / "recipes" / "quickstart.yaml")
TWO = "[{name: a}, {name: b, sparsity: {k: 8}}]"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"trainer.devices": "2"}, r"^trainer\.distribute_saes: .*recipe trains one.*variants"),
        (
            {"variants": TWO, "trainer.devices": "2", "trainer.strategy": "model_parallel"},
            r"^trainer\.distribute_saes: cannot be combined with trainer\.strategy: model_par",
        ),
        (
            {"variants": TWO, "trainer.devices": "3"},
            r"^trainer\.distribute_saes: 2 SAEs cannot be spread over 3 processes.*at most 2",
        ),
        (
            {"variants": TWO, "trainer.devices": "auto"},
            r"^trainer\.devices: is 'auto'.*positive integer",
        ),
    ],
)
def test_recipe_errors_name_the_field_and_the_fix(overrides: dict, match: str) -> None:
    recipe = load_recipe([QUICK], [("trainer.distribute_saes", "true"), *overrides.items()])
    with pytest.raises(ConfigError, match=match):
        check_model_parallel(recipe)


def test_tensor_parallel_size_is_refused_with_distribute() -> None:
    from sae_lightning.parallel.strategy import model_parallel_arguments

    args = {"distribute_saes": True, "tensor_parallel_size": 2, "devices": 2}
    with pytest.raises(ConfigError, match=r"^trainer\.tensor_parallel_size: .*distribute_saes"):
        model_parallel_arguments(args)
