"""Downstream KL / CE-recovered evaluation with the SAE spliced into the language model.

Every ``every_n_steps`` training steps and at every validation, held-out contexts from the LM
DataModule run through the LM clean, with the SAE's reconstruction at the hook, and with the
hook zero-ablated (:mod:`sae_lightning.lm.evaluation`). It works in chunks sized to a memory
budget, and under DDP each rank evaluates its share of the contexts and the sums are reduced
before dividing, so the logged values are those of one process on all contexts.

Named evaluation corpora of the data (``eval_text: {name: sources}``) are evaluated the same
way and logged as ``val/<name>/kl``, ``val/<name>/ce_recovered``, ... with ``val/<name>/fvu``
(the FVU of the SAE on those contexts' activations, transformed as the training data).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from pydantic import Field
from torch import Tensor, nn
from typing_extensions import override

from sae_lightning.cadence import every_n_steps
from sae_lightning.callbacks.batch_end import BatchEndCallback, TrainBatchEnd
from sae_lightning.config import PluginConfig
from sae_lightning.errors import ConfigError
from sae_lightning.metrics import FractionOfVarianceUnexplained
from sae_lightning.protocols import TrainsSAEs

if TYPE_CHECKING:
    from sae_lightning.data.lm_base import LMHandle
    from sae_lightning.lm.text import Contexts


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


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


class E2EKLEvaluation(BatchEndCallback):
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
        """``{"<prefix>e2e/<metric>": value}`` for every SAE the module trains, plus
        ``<prefix>val/<name>/<metric>`` (with ``fvu``) for every named evaluation corpus."""
        lm = self._language_data(trainer).language_model()
        hook = self._hook(lm.hooks)
        n = len(lm.heldout_ids) if self.config.sequences is None else self.config.sequences
        sets = {"e2e/": (lm.heldout_ids[:n], lm.heldout_keep[:n], None)}
        for name, contexts in lm.eval_sets.items():
            sets[f"val/{name}/"] = (contexts.ids, contexts.keep, contexts)
        results: dict[str, Tensor] = {}
        members = pl_module.members() if isinstance(pl_module, TrainsSAEs) else {}
        for prefix, member in members.items():
            for tag, (ids, keep, contexts) in sets.items():
                metrics = self._splice(trainer, pl_module, lm, hook, member.sae, ids, keep)
                if contexts is not None and lm.activations is not None:
                    metrics["fvu"] = self._fvu(trainer, pl_module, lm, member.sae, contexts)
                for key, value in metrics.items():
                    results[f"{prefix}{tag}{key}"] = torch.tensor(value)
        return results

    def _splice(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        lm: LMHandle,
        hook: str,
        sae: nn.Module,
        ids: Tensor,
        keep: Tensor,
    ) -> dict[str, float]:
        """KL / CE metrics of ``sae`` spliced in at ``hook`` over contexts ``ids``, all ranks."""
        from sae_lightning.lm.evaluation import memory_chunk, splice_metrics, spliced_loss_sums

        rank, world = trainer.global_rank, trainer.world_size
        vocab = int(lm.model.get_output_embeddings().weight.shape[0])
        chunk = memory_chunk(self.config.memory_budget_mb * 2**20, ids.shape[1], vocab)
        device = next(sae.parameters()).device

        def reconstruct(a: Tensor) -> Tensor:
            x = a.to(device, torch.float32) * lm.scale
            return (sae(x) / lm.scale).to(a.device)

        with _eval_mode(sae):
            sums = spliced_loss_sums(
                lm.model, hook, lm.io, reconstruct, ids[rank::world], keep[rank::world], chunk
            )
        sums = trainer.strategy.reduce(sums.to(pl_module.device), reduce_op="sum")
        return splice_metrics(sums.cpu())._asdict()

    @staticmethod
    def _fvu(
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        lm: LMHandle,
        sae: nn.Module,
        contexts: Contexts,
    ) -> float:
        """FVU of ``sae`` on the activations of ``contexts`` (transformed as training data)."""
        from sae_lightning.lm.text import Contexts

        assert lm.activations is not None
        rank, world = trainer.global_rank, trainer.world_size
        mine = Contexts(contexts.ids[rank::world], contexts.keep[rank::world])
        metric = FractionOfVarianceUnexplained(int(sae.d_in))
        x = lm.activations(mine).float().to(next(sae.parameters()).device)
        with _eval_mode(sae), torch.no_grad():
            if len(x):
                metric.update(x.cpu(), sae(x).cpu())
        states = torch.cat([metric.sq_err[None], metric.sum_x, metric.sum_sq[None], metric.n[None]])
        states = trainer.strategy.reduce(states.to(pl_module.device), reduce_op="sum").cpu()
        metric.sq_err, metric.sum_x = states[0], states[1:-2]
        metric.sum_sq, metric.n = states[-2], states[-1]
        return float(metric.compute())

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
    def after_train_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, end: TrainBatchEnd
    ) -> None:
        if every_n_steps(end.step, self.config.every_n_steps):
            for key, value in self.evaluate(trainer, pl_module).items():
                pl_module.log(key, value, on_step=True, on_epoch=False, sync_dist=False)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for key, value in self.evaluate(trainer, pl_module).items():
            # Already reduced over ranks; sync_dist only averages equal values.
            pl_module.log(key, value, sync_dist=True)
