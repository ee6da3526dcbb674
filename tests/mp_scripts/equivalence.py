"""Train tiny SAEs on 1 process, or latent-sharded on a (dp x tp) mesh, saving each rank's
final state gathered whole.

    python tests/mp_scripts/equivalence.py OUT_DIR DP TP [CASE ...]

With ``DP x TP > 1`` Lightning's launcher re-executes this file for the other ranks, so every
rank runs every case in the same order; each writes ``OUT_DIR/<case>.rank<r>.pt``. The test
imports :func:`train` to build the one-process reference from exactly the same code.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor

from sae_lightning.data.synthetic import SyntheticConfig, SyntheticDataModule
from sae_lightning.module import SAEModule
from sae_lightning.parallel.comm import traffic
from sae_lightning.parallel.module import ShardedSAEModule

D_IN, D_SAE, BATCH, STEPS, SEED = 16, 32, 64, 20, 0
N_KILLED = 6  # latents started dead (very negative bias), so AuxK has work to do

SPARSITY: dict[str, dict[str, Any]] = {
    "relu": {"name": "relu", "l1_coefficient": 1e-3},
    "topk": {"name": "topk", "k": 3, "aux_coefficient": 0.0},
    "batchtopk": {"name": "batchtopk", "k": 3, "aux_coefficient": 0.0},
    "jumprelu": {"name": "jumprelu", "l0_coefficient": 1e-4, "bandwidth": 0.05},
}


@dataclass(frozen=True)
class Case:
    sparsity: dict[str, Any]
    kill: bool = False
    """Start ``N_KILLED`` latents dead with a short dead window: AuxK is live on them."""
    loss: tuple[tuple[str, Any], ...] = ()


CASES: dict[str, Case] = {
    **{name: Case(spec) for name, spec in SPARSITY.items()},
    "topk+auxk": Case({"name": "topk", "k": 3, "aux_k": 4}, kill=True),
    "batchtopk+auxk": Case({"name": "batchtopk", "k": 3, "aux_k": 4}, kill=True),
    "topk+fvu": Case(SPARSITY["topk"], loss=(("reconstruction", "fvu"),)),
}


class StepMetrics(pl.Callback):
    """Every step's logged metrics (what TensorBoard receives), as floats."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        metrics = trainer.callback_metrics
        self.steps.append({k: float(v) for k, v in metrics.items() if k.startswith("train/")})


def train(name: str, dp: int, tp: int) -> tuple[SAEModule, pl.Trainer, StepMetrics, dict]:
    """Train case ``name`` for ``STEPS`` steps: one process when ``dp = tp = 1`` (the plain
    :class:`SAEModule`), else sharded on a ``dp x tp`` mesh of CPU processes."""
    case = CASES[name]
    pl.seed_everything(SEED, verbose=False)
    data = SyntheticDataModule(
        SyntheticConfig(d=D_IN, n_atoms=64, n_active=3, batch_size=BATCH, val_samples=16),
        seed=SEED,
    )
    kwargs = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "encoder": {"name": "linear"},
        "decoder": {"name": "linear"},
        "sparsity": case.sparsity,
        "optimizer": {},
        "loss": {"dead_window_tokens": 2 * BATCH if case.kill else 100_000, **dict(case.loss)},
    }
    sharded = dp * tp > 1
    module = ShardedSAEModule(**kwargs) if sharded else SAEModule(**kwargs)
    if case.kill:
        with torch.no_grad():
            module.sae.encoder.b_enc[:N_KILLED] = -10.0
    metrics = StepMetrics()
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=dp * tp,
        strategy=ModelParallelStrategy(dp, tp) if sharded else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,  # every step's metrics reach callback_metrics, to compare them all
        callbacks=[metrics],
    )
    with traffic() as counts:
        trainer.fit(module, datamodule=data)
    return module, trainer, metrics, dict(counts)


def whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def summary(module: SAEModule, trainer: pl.Trainer, metrics: StepMetrics, counts: dict) -> dict:
    """Weights, buffers and Adam moments gathered whole, the logged metrics of every step,
    this rank's parameter + optimizer bytes and the bytes its collectives sent."""
    optimizer = trainer.optimizers[0]
    adam = {}
    for pname, param in module.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            adam[f"{pname}.{key}"] = whole(optimizer.state[param][key])
    nbytes = sum(whole(p).numel() * p.element_size() for p in module.parameters())
    nbytes += sum(v.numel() * v.element_size() for v in adam.values())
    if isinstance(module, ShardedSAEModule):
        nbytes = module.parameter_bytes()
    return {
        "state": {k: whole(v) for k, v in module.state_dict().items()},
        "adam": adam,
        "metrics": metrics.steps,
        "bytes": nbytes,
        "traffic": counts,
    }


def main(out_dir: str, dp: str, tp: str, *names: str) -> None:
    out = Path(out_dir)
    for name in names or CASES:
        module, trainer, metrics, counts = train(name, int(dp), int(tp))
        result = summary(module, trainer, metrics, counts)
        torch.save(result, out / f"{name}.rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
