"""Downstream KL / CE-recovered evaluation with the SAE spliced into the language model.

Every ``every_n_steps`` training steps and at every validation, held-out contexts from the LM
DataModule run through the LM clean, with the SAE's reconstruction at the hook, and with the
hook zero-ablated (:mod:`sae_lightning.lm.evaluation`). It works in chunks sized to a memory
budget, and under DDP each rank evaluates its share of the contexts and the sums are reduced
before dividing, so the logged values are those of one process on all contexts.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from pydantic import Field
from torch import Tensor
from typing_extensions import override

from sae_lightning.config import PluginConfig
from sae_lightning.errors import ConfigError
from sae_lightning.module import TrainsSAEs


class E2EKLConfig(PluginConfig):
    every_n_steps: int = Field(
        0, ge=0, description="also evaluate every this many training steps (0: validation only)"
    )
    sequences: int | None = Field(
        None, gt=0, description="held-out contexts per evaluation (default: all of the data's)"
    )
    memory_budget_mb: float = Field(
        1024, gt=0, description="memory for the logits of one chunk of contexts, in MiB"
    )
    hook: str | None = Field(
        None, description="hook to splice at when the data has several (default: the only one)"
    )


class E2EKLEvaluation(pl.Callback):
    """Logs e2e/kl, e2e/ce_clean, e2e/ce_sae, e2e/ce_zero_ablation, e2e/ce_recovered, e2e/kl_score.

    Needs ``lm_activations`` or ``activation_cache`` data (anything with ``language_model()``).
    """

    Config = E2EKLConfig

    def __init__(self, config: E2EKLConfig | None = None) -> None:
        self.config = config or E2EKLConfig()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._language_data(trainer)  # fail before training, not at the first evaluation

    @staticmethod
    def _language_data(trainer: pl.Trainer) -> Any:
        datamodule = trainer.datamodule
        from sae_lightning.lm.e2e_module import LanguageModelData

        if not isinstance(datamodule, LanguageModelData):
            raise ConfigError(
                "callbacks.e2e_kl",
                f"needs language-model data, but the data module is {type(datamodule).__name__}",
                "use data lm_activations or activation_cache",
            )
        return datamodule

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """``{"<prefix>e2e/<metric>": value}`` for every SAE the module trains."""
        from sae_lightning.lm.evaluation import (
            memory_chunk,
            splice_metrics,
            spliced_loss_sums,
        )

        lm = self._language_data(trainer).language_model()
        hook = self._hook(lm.hooks)
        n = len(lm.heldout_ids) if self.config.sequences is None else self.config.sequences
        rank, world = trainer.global_rank, trainer.world_size
        ids, keep = lm.heldout_ids[:n][rank::world], lm.heldout_keep[:n][rank::world]
        vocab = int(lm.model.get_output_embeddings().weight.shape[0])
        chunk = memory_chunk(self.config.memory_budget_mb * 2**20, ids.shape[1], vocab)
        results: dict[str, Tensor] = {}
        members = pl_module.members() if isinstance(pl_module, TrainsSAEs) else {}
        for prefix, member in members.items():
            sae = member.sae
            was_training = sae.training
            sae.eval()
            device = next(sae.parameters()).device

            def reconstruct(
                a: Tensor, sae: Any = sae, device: torch.device = device, scale: float = lm.scale
            ) -> Tensor:
                x = a.to(device, torch.float32) * scale
                return (sae(x) / scale).to(a.device)

            try:
                sums = spliced_loss_sums(lm.model, hook, lm.io, reconstruct, ids, keep, chunk)
            finally:
                sae.train(was_training)
            sums = trainer.strategy.reduce(sums.to(pl_module.device), reduce_op="sum")
            for key, value in splice_metrics(sums.cpu())._asdict().items():
                results[f"{prefix}e2e/{key}"] = torch.tensor(value)
        return results

    def _hook(self, hooks: list[str]) -> str:
        if self.config.hook is not None:
            if self.config.hook not in hooks:
                raise ConfigError(
                    "callbacks.e2e_kl.hook", f"{self.config.hook!r} is not one of {hooks}"
                )
            return self.config.hook
        if len(hooks) != 1:
            raise ConfigError(
                "callbacks.e2e_kl.hook",
                f"the data has {len(hooks)} hooks ({', '.join(hooks)})",
                "name the one to splice the SAE into",
            )
        return hooks[0]

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        every = self.config.every_n_steps
        if every and trainer.global_step % every == 0:
            for key, value in self.evaluate(trainer, pl_module).items():
                pl_module.log(key, value, on_step=True, on_epoch=False, sync_dist=False)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for key, value in self.evaluate(trainer, pl_module).items():
            # Already reduced over ranks; sync_dist only averages equal values.
            pl_module.log(key, value, sync_dist=True)
