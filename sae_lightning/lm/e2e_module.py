"""e2e SAE training (Braun et al. 2024, papers.md section 3): the LM's loss trains the SAE.

:class:`E2ESAEModule` is :class:`~sae_lightning.module.SAEModule` with another training step.
Each batch is whole contexts of token ids (:class:`~sae_lightning.data.activations.TokenBatch`);
the LM runs clean, then again with the SAE's reconstruction replacing the activation at the hook
(kept positions only, as the ``e2e_kl`` callback splices), and the loss is

- ``e2e``: ``kl_weight * KL(P_clean || P_sae) + sparsity penalties``;
- ``e2e_ds``: the same plus ``downstream_coefficient * mean_k MSE(a_sae^(k), a_clean^(k))``
  over the downstream hooks (the paper's ``beta_l / (L - l) * sum_k``, with the reference code's
  elementwise means).

The terms are those of :func:`sae_lightning.lm.e2e.e2e_loss`. The LM is frozen and is not a
submodule (its weights stay out of the optimizer and the checkpoints): gradients flow through
its later layers into the SAE only. AuxK and other auxiliary losses are local reconstruction
objectives and are left out, as the paper uses none. Validation is inherited: FVU and L0 on the
held-out activations; the ``e2e_kl`` callback adds KL and CE recovered on held-out contexts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from sae_lightning.errors import ConfigError
from sae_lightning.lm.hooks import HookIO
from sae_lightning.module import SAEModule, StepOutput
from sae_lightning.step_metrics import core_metrics

E2E_MODES = ("e2e", "e2e_ds")


@dataclass
class E2ETarget:
    """The frozen LM and where the SAE is spliced into it."""

    model: nn.Module
    hook: str
    io: HookIO
    scale: float
    """The data's normalisation factor: the SAE sees ``scale * activation``."""
    downstream: list[str]
    """Later module paths whose activations the e2e_ds terms compare (empty for e2e)."""


@runtime_checkable
class LanguageModelData(Protocol):
    """A data module whose activations come from a language model it can hand out."""

    def language_model(self) -> Any:
        """The LM the activations come from (an ``LMHandle``: model, hooks, io, scale)."""


@runtime_checkable
class TokenBatchData(LanguageModelData, Protocol):
    """A data module that can train on token batches: what e2e training needs of its data."""

    def use_token_batches(self) -> None:
        """Make the training loader yield ``(ids, keep)`` token batches instead of activations."""


def use_token_batches(datamodule: Any) -> None:
    """Switch language-model data to token batches for e2e training.

    Raises:
        ConfigError: naming ``model.loss.mode`` when the data cannot yield token batches.
    """
    if not isinstance(datamodule, TokenBatchData):
        raise ConfigError(
            "model.loss.mode",
            "e2e training runs the language model on token batches, but the data module is "
            f"{type(datamodule).__name__}",
            "use data lm_activations (with or without cache_dir), or set model.loss.mode: local",
        )
    datamodule.use_token_batches()


def downstream_hooks(model: nn.Module, hook: str, io: HookIO, pattern: str | None) -> list[str]:
    """The hooks the e2e_ds terms compare: ``pattern`` resolved, or the blocks after ``hook``.

    By default these are the residual streams strictly between ``hook`` and the output of the
    last block, as the paper's ``k = l + 1 .. L - 1``: for ``io="output"`` the outputs of the
    later blocks but the last, for ``io="input"`` the inputs of all later blocks.

    Raises:
        ConfigError: naming ``model.loss.downstream_hooks`` when ``hook`` is not an item of a
            list of blocks (so its successors are unknown) or no block follows it.
    """
    from sae_lightning.lm.hooks import resolve_hooks

    if pattern is not None:
        return resolve_hooks(model, pattern, field="model.loss.downstream_hooks")
    parent, _, index = hook.rpartition(".")
    blocks = dict(model.named_modules()).get(parent)
    if not index.isdigit() or not isinstance(blocks, nn.ModuleList):
        raise ConfigError(
            "model.loss.downstream_hooks",
            f"cannot tell which layers follow {hook!r}: it is not an item of a list of blocks",
            "name them, e.g. downstream_hooks: model.layers.1[6-9]",
        )
    last = len(blocks) - (1 if io == "input" else 2)
    found = [f"{parent}.{j}" for j in range(int(index) + 1, last + 1)]
    if not found:
        raise ConfigError(
            "model.loss.downstream_hooks",
            f"no residual stream lies between {hook!r} ({io}) and the last block",
            "use model.loss.mode: e2e, or hook an earlier layer",
        )
    return found


class E2ESAEModule(SAEModule):
    """Trains the SAE on the LM's next-token distribution (``model.loss.mode`` e2e or e2e_ds).

    Args: as :class:`~sae_lightning.module.SAEModule`.

    Raises:
        ConfigError: naming ``model.loss.mode`` when it is ``local``.
    """

    loss_modes: ClassVar[tuple[str, ...]] = E2E_MODES
    takes_token_batches: ClassVar[bool] = True
    _target: E2ETarget | None = None  # a dataclass, so the LM is no submodule; set on first use

    def configure_data_module(self, datamodule: Any) -> None:
        """Switch ``datamodule`` to token batches (see :func:`use_token_batches`)."""
        use_token_batches(datamodule)

    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.datamodule is not None:
            use_token_batches(self.trainer.datamodule)

    def target(self) -> E2ETarget:
        """The LM of the trainer's data module, the hook and the downstream hooks."""
        datamodule = self.trainer.datamodule
        if self._target is None:
            lm = datamodule.language_model()
            if len(lm.hooks) != 1:
                raise ConfigError(
                    "data.hook",
                    f"e2e training splices one SAE at one hook, but it names {lm.hooks}",
                    "name a single module",
                )
            ds: list[str] = []
            if self.loss_config.mode == "e2e_ds":
                ds = downstream_hooks(
                    lm.model, lm.hooks[0], lm.io, self.loss_config.downstream_hooks
                )
            self._target = E2ETarget(lm.model, lm.hooks[0], lm.io, lm.scale, ds)
        self._target.scale = float(datamodule.scale)  # restored from a checkpoint after setup
        return self._target

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        ids, keep = batch
        out = self.compute_e2e_step(self.target(), ids, keep, step=self.global_step)
        self.log_metrics(out.metrics)
        return {"loss": out.loss, "terms": {k: v.detach() for k, v in out.terms.items()}}

    def compute_e2e_step(
        self, target: E2ETarget, ids: Tensor, keep: Tensor, *, step: int
    ) -> StepOutput:
        """Loss, terms and metrics of one token batch; advances the dead-latent counters.

        Args:
            target: the LM and the hooks.
            ids: ``(contexts, seq)`` token ids.
            keep: ``(contexts, seq)`` bool, the positions the SAE replaces.
            step: the global step (for step-dependent sparsity plugins).
        """
        from sae_lightning.lm.e2e import e2e_loss

        seen: dict[str, Any] = {}
        dtype = next(self.sae.parameters()).dtype

        def reconstruct(a: Tensor) -> Tensor:
            x = a[keep].to(dtype) * target.scale  # (kept positions, d_in), the SAE's scale
            run = self.sae.run(x, step=step)
            seen["x"], seen["run"] = x, run
            new = a.clone()
            new[keep] = (run.x_hat / target.scale).to(a.dtype)
            return new

        lm_terms = e2e_loss(
            target.model, target.hook, target.io, reconstruct, ids, target.downstream
        )
        x, run = seen["x"], seen["run"]
        terms = {"kl": self.loss_config.kl_weight * lm_terms.kl}
        if self.loss_config.mode == "e2e_ds":
            terms["downstream"] = self.loss_config.downstream_coefficient * lm_terms.downstream
        terms.update(run.penalties)
        loss = torch.stack([t.to(dtype) for t in terms.values()]).sum()
        metrics = core_metrics(loss, terms, run.codes)
        metrics["train/kl"] = lm_terms.kl.detach().float()
        if target.downstream:
            metrics["train/downstream_mse"] = lm_terms.downstream.detach().float()
        residual = (x - run.x_hat).detach()
        metrics = self.finish_step_metrics(metrics, x, residual, x.shape[0], run.codes)
        return StepOutput(loss, terms, metrics)
