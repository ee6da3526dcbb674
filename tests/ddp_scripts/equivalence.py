"""Train tiny SAEs on 1 process or with Lightning DDP, saving every rank's final state.

    python tests/ddp_scripts/equivalence.py OUT_DIR DEVICES [CASE ...]

With ``DEVICES=2`` Lightning's ``ddp`` launcher re-executes this file for rank 1, so both ranks
run every case in the same order; each writes ``OUT_DIR/<case>.rank<r>.pt``. The test imports
:func:`train` to build the one-process reference from exactly the same code.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from sae_lightning.callbacks.resampling import DeadFeatureResampler, DeadFeatureResamplerConfig
from sae_lightning.data.synthetic import SyntheticConfig, SyntheticDataModule
from sae_lightning.kernels import DeadSelection
from sae_lightning.module import SAEModule
from sae_lightning.multi import MultiSAEModule

D_IN, D_SAE, BATCH, STEPS, SEED = 16, 32, 64, 8, 0
N_KILLED = 6  # latents started dead (very negative bias), so the resampler has work to do

SPARSITY: dict[str, dict[str, Any]] = {
    "relu": {"name": "relu", "l1_coefficient": 1e-3},
    "topk": {"name": "topk", "k": 3},
    "batchtopk": {"name": "batchtopk", "k": 3},
    "jumprelu": {"name": "jumprelu", "l0_coefficient": 1e-4, "bandwidth": 0.05},
}
NO_AUXK = {"aux_coefficient": 0.0}


@dataclass(frozen=True)
class Case:
    """One training configuration; ``saes`` holds several specs for a multi-SAE module."""

    saes: dict[str, dict[str, Any]]
    resample: bool = False
    loss: dict[str, Any] = field(default_factory=dict)
    multi: bool = False
    resampler: dict[str, Any] = field(default_factory=dict)
    """Extra :class:`DeadFeatureResamplerConfig` fields (e.g. ``procedure``)."""


# Without resampling no latent dies within 8 steps, so AuxK (on by default for the TopK family)
# is exactly zero: these are the default configs. The "+resample" cases switch AuxK off to test
# the resampler alone; the "+resample+auxk" cases keep it, live on the dead latents, so its
# variance normaliser must be reduced over ranks too.
CASES: dict[str, Case] = {
    **{name: Case({"": spec}) for name, spec in SPARSITY.items()},
    **{
        f"{name}+resample": Case({"": {**spec, **(NO_AUXK if "k" in spec else {})}}, True)
        for name, spec in SPARSITY.items()
    },
    "topk+fvu": Case({"": SPARSITY["topk"]}, loss={"reconstruction": "fvu"}),
    "multi+resample": Case(
        {
            "topk": {**SPARSITY["topk"], **NO_AUXK},
            "batchtopk": {**SPARSITY["batchtopk"], **NO_AUXK},
            "relu": SPARSITY["relu"],
        },
        resample=True,
        multi=True,
    ),
    "topk+resample+auxk": Case({"": SPARSITY["topk"]}, True),
    # The TopK procedure: k-means directions, per-row threshold norms, live-mean Adam moments.
    **{
        f"{name}+resample_topk": Case(
            {"": {**SPARSITY[name], **NO_AUXK}}, True, resampler={"procedure": "topk"}
        )
        for name in ("topk", "batchtopk")
    },
    "batchtopk+resample+auxk": Case({"": SPARSITY["batchtopk"]}, True),
}


def sae_kwargs(sparsity: dict[str, Any], case: Case) -> dict[str, Any]:
    return {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "encoder": {"name": "linear"},
        "decoder": {"name": "linear"},
        "sparsity": sparsity,
        # The default optimizer (lr 1e-3). Adam's first step maps a gradient coordinate g to
        # about lr * g / (|g| + eps): a coordinate that cancels to ~eps keeps a few % of the
        # rounding difference between the two summation orders and turns it into a weight
        # difference proportional to lr (measured in topk+resample: 3e-5 at lr=1e-2, one
        # coordinate whose gradient was 5e-8; 3e-6 at lr=1e-3).
        "optimizer": {},
        "loss": {"dead_window_tokens": 2 * BATCH if case.resample else 100_000, **case.loss},
    }


def train(name: str, devices: int) -> tuple[pl.LightningModule, DeadFeatureResampler | None, int]:
    """Train case ``name`` for ``STEPS`` steps on ``devices`` CPU processes.

    Returns:
        The module, the resampler (or None) and this process's global rank.
    """
    case = CASES[name]
    pl.seed_everything(SEED, verbose=False)
    data = SyntheticDataModule(
        SyntheticConfig(d=D_IN, n_atoms=64, n_active=3, batch_size=BATCH, val_samples=16),
        seed=SEED,
    )
    if case.multi:
        module: Any = MultiSAEModule(
            {n: sae_kwargs(s, case) for n, s in case.saes.items()}, seed=SEED
        )
    else:
        module = SAEModule(**sae_kwargs(case.saes[""], case))
    callbacks: list[pl.Callback] = []
    resampler = None
    if case.resample:
        with torch.no_grad():
            for member in module.members().values():
                member.sae.encoder.b_enc[:N_KILLED] = -10.0
        resampler = DeadFeatureResampler(
            DeadFeatureResamplerConfig(
                every_n_steps=3, max_resamples=2, n_candidates=2 * BATCH, **case.resampler
            )
        )
        callbacks.append(resampler)
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    widths = record_aux_widths(module)
    trainer.fit(module, datamodule=data)
    module.aux_widths = widths
    return module, resampler, trainer.global_rank


def record_aux_widths(module: Any) -> list[int]:
    """The width of AuxK's selection in each forward pass (0: none can be dead; ``k_aux``
    when the host cannot bound how many are)."""
    widths: list[int] = []
    for member in module.members().values():
        real = member.sae.run

        def run(x: torch.Tensor, *, _real: Any = real, **kw: Any) -> Any:
            out = _real(x, **kw)
            if isinstance(out.aux_source, DeadSelection):
                widths.append(out.aux_source.values.shape[1])
            return out

        member.sae.run = run
    return widths


def summary(module: pl.LightningModule, resampler: DeadFeatureResampler | None) -> dict[str, Any]:
    """What the test compares: weights, buffers and how many latents were resampled."""
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "resampled": resampler.total_resampled if resampler is not None else 0,
        "aux_widths": module.aux_widths,
    }


def main(out_dir: str, devices: str, *names: str) -> None:
    out = Path(out_dir)
    for name in names or CASES:
        module, resampler, rank = train(name, int(devices))
        torch.save(summary(module, resampler), out / f"{name}.rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
