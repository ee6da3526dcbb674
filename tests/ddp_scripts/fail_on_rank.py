"""Two CPU ranks with Lightning DDP; rank ``RANK`` raises at step 2.

    python tests/ddp_scripts/fail_on_rank.py RANK

The test checks that the job stops (no rank waits forever in a collective), exits non-zero and
shows the error once.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl

from sae_lightning.data.synthetic import SyntheticConfig, SyntheticDataModule
from sae_lightning.module import SAEModule


class RaiseOnRank(pl.Callback):
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 2 and trainer.global_rank == self.rank:
            raise RuntimeError(f"deliberate failure on rank {self.rank}")


def main(rank: str) -> None:
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
        callbacks=[RaiseOnRank(int(rank))],
    )
    trainer.fit(module, datamodule=data)


if __name__ == "__main__":
    main(sys.argv[1])
