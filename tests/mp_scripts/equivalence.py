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

from sae_lightning.callbacks.resampling import DeadFeatureResampler, DeadFeatureResamplerConfig
from sae_lightning.data.synthetic import SyntheticConfig, SyntheticDataModule
from sae_lightning.module import SAEModule
from sae_lightning.parallel.comm import traffic
from sae_lightning.parallel.module import ShardedSAEModule

D_IN, D_SAE, BATCH, STEPS, SEED = 16, 32, 64, 20, 0
N_KILLED = 6  # latents started dead (very negative bias), so AuxK and the resampler have work

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
    resampler: tuple[tuple[str, Any], ...] | None = None
    """With the resampler (these extra config fields): resamples at steps 3 and 6."""
    precision: str = "32-true"

    @property
    def auxk(self) -> bool:
        """AuxK is live: a TopK-family plugin with its default coefficient, latents dead."""
        return self.kill and "aux_coefficient" not in self.sparsity and "k" in self.sparsity


AUXK = {"aux_k": 4}
RESAMPLE = ()  # the anthropic procedure
RESAMPLE_TOPK = (("procedure", "topk"),)  # residual clusters, threshold norms, live_mean


CASES: dict[str, Case] = {
    **{name: Case(spec) for name, spec in SPARSITY.items()},
    "topk+auxk+resample": Case({"name": "topk", "k": 3, **AUXK}, True, resampler=RESAMPLE),
    "batchtopk+auxk+resample": Case(
        {"name": "batchtopk", "k": 3, **AUXK}, True, resampler=RESAMPLE_TOPK
    ),
    "relu+resample": Case(SPARSITY["relu"], True, resampler=RESAMPLE),
    "jumprelu+resample": Case(SPARSITY["jumprelu"], True, resampler=RESAMPLE_TOPK),
    "topk+fvu": Case(SPARSITY["topk"], loss=(("reconstruction", "fvu"),)),
    **{
        f"{name}+bf16": Case(SPARSITY[name], precision="bf16-mixed")
        for name in ("topk", "batchtopk", "relu")
    },
}


class StepMetrics(pl.Callback):
    """Every step's logged metrics (what TensorBoard receives), as floats."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        metrics = trainer.callback_metrics
        self.steps.append({k: float(v) for k, v in metrics.items() if k.startswith("train/")})


def train(name: str, dp: int, tp: int) -> tuple[SAEModule, pl.Trainer, list[pl.Callback], dict]:
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
    callbacks: list[pl.Callback] = [metrics]
    if case.resampler is not None:
        config = {"every_n_steps": 3, "max_resamples": 2, "n_candidates": 2 * BATCH}
        config.update(case.resampler)
        callbacks.append(DeadFeatureResampler(DeadFeatureResamplerConfig(**config)))
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        precision=case.precision,
        devices=dp * tp,
        strategy=ModelParallelStrategy(dp, tp) if sharded else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,  # every step's metrics reach callback_metrics, to compare them all
        callbacks=callbacks,
    )
    with traffic() as counts:
        trainer.fit(module, datamodule=data)
    return module, trainer, callbacks, dict(counts)


def whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def summary(
    module: SAEModule, trainer: pl.Trainer, callbacks: list[pl.Callback], counts: dict
) -> dict:
    """Weights, buffers and Adam moments gathered whole, the logged metrics of every step,
    this rank's parameter + optimizer bytes, the bytes its collectives sent and how many
    latents the resampler (if any) rewrote."""
    metrics = callbacks[0]
    assert isinstance(metrics, StepMetrics)
    resampled = [c.total_resampled for c in callbacks if isinstance(c, DeadFeatureResampler)]
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
        "resampled": resampled[0] if resampled else 0,
    }


def main(out_dir: str, dp: str, tp: str, *names: str) -> None:
    out = Path(out_dir)
    for name in names or CASES:
        module, trainer, callbacks, counts = train(name, int(dp), int(tp))
        result = summary(module, trainer, callbacks, counts)
        torch.save(result, out / f"{name}.rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
