"""Train a 3-SAE recipe with ``trainer.distribute_saes`` on W CPU processes, then resume it from
its first checkpoint; each rank records which SAEs and bytes it held.

    python tests/mp_scripts/distribute.py OUT_DIR W

Lightning's launcher re-executes this file for the other ranks. Writes the run folders
``OUT_DIR/{run,resumed}/quickstart/version_0`` and ``OUT_DIR/rank<r>.json``. The test imports
:func:`recipe` to train the same SAEs in one process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sae_lightning.multi import MultiSAEModule
from sae_lightning.recipe import load_recipe
from sae_lightning.runner import build_run, finish, preflight

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 12, 6
VARIANTS = (
    "[{name: topk_k4}, {name: batchtopk_k4, sparsity: {name: batchtopk, k: 4}},"
    " {name: relu, sparsity: {name: relu, l1_coefficient: 0.001}}]"
)


def recipe(out: Path, devices: int, distribute: bool):
    overrides = {
        "output_dir": str(out),
        "trainer.devices": str(devices),
        "trainer.distribute_saes": str(distribute).lower(),
        "trainer.max_steps": str(STEPS),
        "trainer.val_check_interval": str(EVERY),
        "trainer.log_every_n_steps": "2",
        "trainer.enable_progress_bar": "false",
        "data.batch_size": "128",
        "data.val_samples": "128",
        "checkpoint.every_n_steps": str(EVERY),
        "checkpoint.keep": "-1",
        "model.d_sae": "64",
        "model.optimizer.warmup_steps": "2",
        # a short window, so latents die and the resampler (every 4 steps) has work
        "model.loss.dead_window_tokens": "256",
        "variants": VARIANTS,
        "callbacks": "[{name: resampler, every_n_steps: 4, n_candidates: 256}]",
    }
    return load_recipe([ROOT / "recipes" / "quickstart.yaml"], overrides.items())


def train(out: Path, devices: int, distribute: bool, ckpt_path: str | None = None):
    """``runner.fit`` with the module kept: build, check, fit, validate and export."""
    run = build_run(recipe(out, devices, distribute))
    preflight(run)
    run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=ckpt_path)
    finish(run)
    return run


def main(out_dir: str, devices: str) -> None:
    out = Path(out_dir)
    run = train(out / "run", int(devices), True)
    module = run.module
    assert isinstance(module, MultiSAEModule)
    held = {
        "saes": list(module.saes),
        "parameters": [name for name, _ in module.named_parameters()],
        "bytes": sum(p.numel() * p.element_size() for p in module.parameters()),
        "optimizer_bytes": sum(
            v.numel() * v.element_size()
            for state in run.trainer.optimizers[0].state.values()
            for v in state.values()
            if v.ndim > 0
        ),
    }
    rank = run.trainer.global_rank
    first = run.run_dir / "checkpoints" / f"step{EVERY:07d}.ckpt"
    train(out / "resumed", int(devices), True, ckpt_path=str(first))
    (out / f"rank{rank}.json").write_text(json.dumps(held))


if __name__ == "__main__":
    main(*sys.argv[1:])
