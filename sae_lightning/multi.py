"""Several SAEs trained in one pass over one stream, each exactly as it would train alone.

:class:`MultiSAEModule` holds one :class:`~sae_lightning.module.SAEModule` per variant (e.g.
several sparsity settings) and feeds each the same batch. Their losses are summed, but no
parameter is shared, so each SAE's gradient is the gradient of its own loss; one Adam
optimizer holds one parameter group and one lr schedule per SAE, and Adam is elementwise, so
each SAE follows the trajectory it follows alone with the same seed and data. Metrics are
logged under ``<name>/`` (``topk_k8/train/loss``) and each SAE is exported to its own folder.

Under DDP every rank holds every SAE and a slice of the batch (docs/multi-gpu.md explains why
that is the default). With ``distribute=True`` (``trainer.distribute_saes``) the SAEs are
spread over the processes instead: process ``r`` of ``W`` keeps the SAEs ``i`` with
``i mod W = r`` (:meth:`MultiSAEModule.configure_model`), reads every batch whole and trains
them alone (no gradient all-reduce, no collective in the loss); the metrics of all SAEs are
gathered to every process at logging steps and validations, so rank 0 logs them all.

A recipe asks for it with ``variants:``, a list of ``model:`` overrides (docs/multi-gpu.md)::

    variants:
      - {name: topk_k4, sparsity: {k: 4}}
      - {name: topk_k8, sparsity: {k: 8}}

and the runner builds this module instead of a single :class:`SAEModule`
(:func:`~sae_lightning.runner.build_multi_module`); from Python,
:func:`~sae_lightning.runner.fit_many` does the same with a ``{name: overrides}`` mapping.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics import Metric

from sae_lightning.cadence import logs_step
from sae_lightning.counter_bound import keep_counters_out_of_ddp_sync
from sae_lightning.errors import ConfigError
from sae_lightning.module import (
    CHECKPOINT_KEY,
    SAEModule,
    as_tensor,
    build_optimizer,
    log_density_histogram,
    terminate_ranks_on_error,
)
from sae_lightning.recipe import SAE_NAME
from sae_lightning.solo import training_alone


class MultiSAEModule(pl.LightningModule):
    """Trains several SAEs on the same batches; each logs under ``<name>/`` and exports alone.

    Args:
        saes: name -> :class:`~sae_lightning.module.SAEModule` keyword arguments (``d_in``,
            ``d_sae``, ``encoder``, ``decoder``, ``sparsity``, ``optimizer``, ``loss``). Names
            become log prefixes and export folders, so they use letters, digits, ``_.-``.
        seed: when set, each SAE is initialised right after ``torch.manual_seed(seed)``, as a
            run of that SAE alone seeded with ``seed`` is; None draws them one after another.
        distribute: spread the SAEs over the processes (each process keeps its own subset
            once Lightning calls :meth:`configure_model`); needs ``ModelParallelStrategy`` on a
            ``1 x W`` mesh (the runner builds it from ``trainer.distribute_saes``).

    Raises:
        ConfigError: no SAE, a bad name, different input widths, or a bad SAE argument
            (reported under ``saes.<name>``).
    """

    def __init__(
        self, saes: dict[str, dict[str, Any]], seed: int | None = None, distribute: bool = False
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not saes:
            raise ConfigError("saes", "is empty", "give at least one {name: SAEModule kwargs}")
        members: dict[str, SAEModule] = {}
        for name, kwargs in saes.items():
            _check_name(name)
            try:
                if seed is None:
                    members[name] = SAEModule(**kwargs)
                else:
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seed)
                        members[name] = SAEModule(**kwargs)
            except ConfigError as err:
                raise err.under(f"saes.{name}") from None
        widths = {name: m.sae.d_in for name, m in members.items()}
        if len(set(widths.values())) > 1:
            raise ConfigError(
                "saes",
                f"SAEs trained on one stream need one input width, got {widths}",
                "give every SAE the d_in of the data",
            )
        self.saes = nn.ModuleDict(members)
        keep_counters_out_of_ddp_sync(self)
        self.names: tuple[str, ...] = tuple(members)
        """Every SAE of the run, in order (under ``distribute``, ``saes`` holds this
        process's)."""
        self.plugin_versions = {name: m.plugin_versions for name, m in members.items()}
        self.distribute = distribute
        self.spread = False
        """True once the SAEs are spread over more than one process."""
        self._term_names: list[str] | None = None  # every process's loss terms, see _all_terms

    takes_token_batches: ClassVar[bool] = False
    """Its members train on activations (local mode)."""

    def members(self) -> dict[str, SAEModule]:
        """The SAEs, by name."""
        return dict(self.saes.items())

    def configure_data_module(self, datamodule: pl.LightningDataModule) -> None:
        """Nothing to adapt: every member trains on the data's activation batches."""

    def configure_model(self) -> None:
        """Under ``distribute``, keep this process's SAEs: SAE ``i`` (in ``names`` order) goes to
        process ``i mod W``. Lightning calls it once the processes exist, before the optimizer
        is built and a checkpoint is loaded.

        Raises:
            ConfigError: more processes than SAEs.
        """
        if not self.distribute or self.spread:
            return
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if world == 1:
            return
        if world > len(self.names):
            raise ConfigError(
                "trainer.distribute_saes",
                f"{len(self.names)} SAEs cannot be spread over {world} processes",
                f"use at most {len(self.names)} processes",
            )
        own = {name: m for i, (name, m) in enumerate(self.saes.items()) if i % world == rank}
        self.saes = nn.ModuleDict(own)
        for member in own.values():
            for metric in member.modules():
                if isinstance(metric, Metric):  # each process validates its SAEs on all data
                    metric.distributed_available_fn = _alone_in_the_world
        self.spread = True

    def _alone(self) -> AbstractContextManager[None]:
        """Spread SAEs see only this process: their loss terms and statistics issue no
        collective."""
        return training_alone() if self.spread else nullcontext()

    def _each_process(self, values: dict[str, Any]) -> list[dict[str, Any]]:
        """Every process's ``values``, in rank order (one ``all_gather_object``; every process
        calls it)."""
        gathered: list[dict[str, Any] | None] = [None] * self.trainer.world_size
        dist.all_gather_object(gathered, values)
        return [part or {} for part in gathered]

    def from_every_process(self, values: dict[str, Any]) -> dict[str, Any]:
        """Every process's ``values`` merged, so each process logs the metrics of every SAE."""
        return {k: v for part in self._each_process(values) for k, v in part.items()}

    def _gather_step_logs(self, logged: dict[str, Tensor]) -> dict[str, float]:
        """Every SAE's step metrics, read on the host at logging steps only; ``train/loss_sum``
        summed over the processes."""
        parts = self._each_process({k: float(v) for k, v in logged.items()})
        total = sum(part.pop("train/loss_sum") for part in parts)
        merged = {k: v for part in parts for k, v in part.items()}
        merged["train/loss_sum"] = total
        return merged

    def _all_terms(self, terms: dict[str, Tensor], zero: Tensor) -> dict[str, Tensor]:
        """The loss terms of every SAE, 0 for those other processes hold: the same names on
        every process, as the non-finite guard's gather needs. The names are exchanged once
        (an SAE's terms are fixed by its plugins)."""
        if self._term_names is None:
            merged = self.from_every_process({name: None for name in terms})
            self._term_names = list(merged)
        return {name: terms.get(name, zero) for name in self._term_names}

    def log_per_sae(self, values: dict[str, float | Tensor]) -> None:
        """Log epoch-level values of this process's SAEs (``<name>/...`` keys); spread SAEs'
        values are gathered first, so every process logs every SAE's. Every process calls it."""
        if self.spread:
            values = self.from_every_process({k: float(v) for k, v in values.items()})
        for key, value in values.items():
            self.log(key, value, sync_dist=True)  # equal on all ranks: the sync is a no-op

    # ---- training -------------------------------------------------------------------------

    def training_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int) -> dict[str, Any]:
        x = as_tensor(batch)
        losses, terms, logged = [], {}, {}
        log = logs_step(self.trainer, self.global_step)  # see SAEModule.log_metrics
        with self._alone():
            for name, member in self.saes.items():
                out = member.compute_step(x, step=self.global_step)
                if log:
                    member.refresh_dead_bound()
                    logged.update({f"{name}/{k}": v for k, v in out.metrics.items()})
                losses.append(out.loss)
                terms.update({f"{name}/{k}": v.detach() for k, v in out.terms.items()})
        loss = torch.stack(losses).sum()
        if log:  # the progress bar shows it as logged
            logged["train/loss_sum"] = loss.detach()
        if self.spread:
            terms = self._all_terms(terms, loss.detach().new_zeros(()))
            if log:
                logged = self._gather_step_logs(logged)
        for key, value in logged.items():
            self.log(key, value)
        return {"loss": loss, "terms": terms}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for member in self.saes.values():
            member.sae.before_optimizer_step()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        for member in self.saes.values():
            member.sae.after_optimizer_step()

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip each SAE's gradients on their own, so SAEs never scale each other's steps."""
        if gradient_clip_val is None:
            return
        for member in self.saes.values():
            params = [p for p in member.parameters() if p.grad is not None]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def configure_optimizers(self) -> dict[str, Any]:
        groups = [
            ([p for p in m.parameters() if p.requires_grad], m.optimizer_config)
            for m in self.saes.values()
        ]
        return build_optimizer(groups, self.trainer)

    def configure_callbacks(self) -> list[pl.Callback]:
        return terminate_ranks_on_error(self.trainer)

    # ---- evaluation -----------------------------------------------------------------------

    def validation_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int) -> None:
        x = as_tensor(batch)
        with self._alone():
            for member in self.saes.values():
                member.update_validation(x, step=self.global_step)

    def on_validation_epoch_end(self) -> None:
        values: dict[str, float | Tensor] = {}
        densities: dict[str, Tensor] = {}
        for name, member in self.saes.items():
            results, densities[name] = member.validation_results()
            values.update({f"{name}/{key}": value for key, value in results.items()})
        if self.spread:  # rank 0 draws every SAE's histogram
            densities = self.from_every_process({k: v.cpu() for k, v in densities.items()})
        self.log_per_sae(values)
        for name, density in densities.items():
            log_density_histogram(self, density, prefix=f"{name}/")

    # ---- checkpoints -----------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from sae_lightning._version import __version__

        checkpoint[CHECKPOINT_KEY] = {
            "version": __version__,
            "plugins": self.plugin_versions,  # every SAE's, also under distribute
        }


def member_metrics(metrics: dict[str, float], name: str) -> dict[str, float]:
    """The metrics of the SAE ``name`` of a multi-SAE run, without the ``<name>/`` prefix."""
    prefix = f"{name}/"
    return {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}


def _alone_in_the_world() -> bool:
    """torchmetrics' test for a process group to sync over: none, for a spread SAE's metrics."""
    return False


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not SAE_NAME.match(name):
        raise ConfigError(
            f"saes.{name}",
            "is not a valid SAE name",
            "use letters, digits, '_', '.' and '-' (it becomes a log prefix and a folder)",
        )
