"""Two CPU ranks with Lightning DDP; rank ``RANK`` raises at step 2, or gets a NaN weight.

    python tests/ddp_scripts/fail_on_rank.py RANK [raise|nan]

The test checks that the job stops (no rank waits forever in a collective), exits non-zero and
shows the error once. In ``nan`` mode ``NonFiniteGuard`` must report the poisoned rank once,
printed the way the CLI prints it.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch

from sae_lightning.callbacks import NonFiniteGuard
from sae_lightning.data.synthetic import SyntheticConfig, SyntheticDataModule
from sae_lightning.errors import NonFiniteError
from sae_lightning.module import SAEModule


class RaiseOnRank(pl.Callback):
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 2 and trainer.global_rank == self.rank:
            raise RuntimeError(f"deliberate failure on rank {self.rank}")


class PoisonOnRank(pl.Callback):
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 3 and trainer.global_rank == self.rank:
            with torch.no_grad():
                pl_module.sae.encoder.W_enc[0, 0] = float("nan")


def main(rank: str, mode: str = "raise") -> None:
    pl.seed_everything(0, verbose=False)
    data = SyntheticDataModule(SyntheticConfig(d=8, batch_size=16, val_samples=16), seed=0)
    module = SAEModule(8, 16, {"name": "linear"}, {"name": "linear"}, {"name": "topk", "k": 2})
    trainer = pl.Trainer(
        max_steps=1000,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[RaiseOnRank(int(rank))]
        if mode == "raise"
        else [PoisonOnRank(int(rank)), NonFiniteGuard()],
    )
    try:
        trainer.fit(module, datamodule=data)
    except NonFiniteError as err:  # printed as the CLI prints it
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(*sys.argv[1:])
