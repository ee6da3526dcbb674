"""The one LightningModule: trains any registered encoder + sparsity + decoder.

Loss = reconstruction + the sparsity plugin's penalties + its auxiliary terms (e.g. AuxK), each
logged on its own under ``train/loss/<term>``. The module calls only the plugin protocols; the
hot path keeps counts as tensors and never synchronises with the host.

Under DDP (see docs/multi-gpu.md) every rank computes its loss on its slice of the global batch
and Lightning averages the gradients. Each loss term is therefore this rank's *share*: a mean
over the local rows, or a sum divided by this rank's share of the global variance
(:func:`~sae_lightning.components.base.total_variance_share`), so the average over ranks is the
term one process computes on the whole batch. The dead-latent counters and the logged training
metrics are reduced over ranks with one all-reduce per step, so every rank agrees which latents
are dead and logs global values.
"""

from __future__ import annotations

import math
import signal
from typing import Any, ClassVar, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchmetrics import MeanMetric
from typing_extensions import override

from sae_lightning.cadence import logs_step
from sae_lightning.components.base import (
    Codes,
    DeadLatents,
    Touched,
    data_parallel_world_size,
    total_variance_share,
)
from sae_lightning.config import LossConfig, OptimizerConfig, PluginSpec, split_spec, validate_model
from sae_lightning.counter_bound import CounterBound, keep_counters_out_of_ddp_sync
from sae_lightning.errors import ConfigError
from sae_lightning.functional import (
    as_points,
    is_function_batch,
    l2_norm_sq,
    relative_l2,
    relative_l2_of_residual,
)
from sae_lightning.metrics import FeatureDensity, FractionOfVarianceUnexplained, dead_fraction_key
from sae_lightning.registry import registry
from sae_lightning.sae import SparseAutoencoder
from sae_lightning.spec import SAESpec
from sae_lightning.step_metrics import core_metrics, global_step_statistics
from sae_lightning.versioning import migrate_checkpoint

CHECKPOINT_KEY = "sae_lightning"
"""Key of this package's own entry in Lightning checkpoints (versions of the core and plugins)."""


def lr_lambda(cfg: OptimizerConfig, total_steps: int):
    """Multiplier of the peak lr at each step: linear warm-up, then the configured decay."""
    total = max(total_steps, 1)
    decay_from = max(cfg.warmup_steps, int(cfg.decay_start * total))

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.decay == "constant" or step < decay_from:
            return 1.0
        progress = min(1.0, (step - decay_from) / max(total - decay_from, 1))
        shape = (
            (1 - progress) if cfg.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        )
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return factor


def build_optimizer(
    groups: list[tuple[list[torch.nn.Parameter], OptimizerConfig]], trainer: pl.Trainer
) -> dict[str, Any]:
    """Adam(W) with one parameter group and one lr schedule per ``(params, config)`` pair.

    Adam is elementwise, so each group trains exactly as it would in an optimizer of its own.
    AdamW is used when any group has weight decay; with ``weight_decay=0`` it equals Adam.
    """
    params = [p for ps, _ in groups for p in ps]
    fused_options = {cfg.fused for _, cfg in groups}
    fused = fused_options.pop() if len(fused_options) == 1 else None
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    decoupled = any(cfg.weight_decay > 0 for _, cfg in groups)
    opt_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    optimizer = opt_cls(
        [
            {
                "params": ps,
                "lr": cfg.lr,
                "betas": cfg.betas,
                "eps": cfg.eps,
                "weight_decay": cfg.weight_decay,
            }
            for ps, cfg in groups
        ],
        fused=fused,
    )
    total = trainer.max_steps if trainer.max_steps > 0 else None
    if total is None:
        total = int(trainer.estimated_stepping_batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lr_lambda(cfg, total) for _, cfg in groups]
    )
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"},
    }


class StepOutput(NamedTuple):
    """One SAE's training step on one batch."""

    loss: Tensor
    """The scalar this rank back-propagates (the sum of ``terms``)."""
    terms: dict[str, Tensor]
    """Each loss term, this rank's share (see the module docstring)."""
    metrics: dict[str, Tensor]
    """Scalars to log, keyed ``train/...``, already reduced over ranks."""


class TerminateRanksOnError(pl.Callback):
    """When rank 0 raises, kill the ranks Lightning's launcher started, so none waits forever.

    Lightning's own launcher stops everything when a child rank fails, but a failure on rank 0
    leaves its children blocked in the next collective (with NCCL, until the timeout). torchrun
    and SLURM watch their processes themselves; their launchers have no children to kill.
    """

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        launcher = trainer.strategy.launcher
        if launcher is not None and trainer.world_size > 1:
            launcher.kill(getattr(signal, "SIGKILL", signal.SIGTERM))


def terminate_ranks_on_error(trainer: pl.Trainer) -> list[pl.Callback]:
    """``[TerminateRanksOnError()]`` unless ``trainer`` has one (from an earlier fit)."""
    if any(isinstance(c, TerminateRanksOnError) for c in trainer.callbacks):
        return []
    return [TerminateRanksOnError()]


class SAEModule(pl.LightningModule):
    """Trains a :class:`SparseAutoencoder` composed from plugin specs.

    Args:
        d_in: input width.
        d_sae: number of latents.
        encoder, decoder, sparsity: plugin specs ``{"name": ..., **params}``.
        optimizer: :class:`~sae_lightning.config.OptimizerConfig` fields.
        loss: :class:`~sae_lightning.config.LossConfig` fields.

    Raises:
        ConfigError: naming ``model.loss.mode`` when the class does not train that mode.
    """

    loss_modes: ClassVar[tuple[str, ...]] = ("local",)
    """The ``model.loss.mode`` values this module trains."""
    takes_token_batches: ClassVar[bool] = False
    """Whether its training batches are token ids rather than activations (the runner's
    preflight then skips the activation checks of the training loader)."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        encoder: PluginSpec,
        decoder: PluginSpec,
        sparsity: PluginSpec,
        optimizer: dict[str, Any] | None = None,
        loss: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.optimizer_config: OptimizerConfig = validate_model(
            OptimizerConfig, optimizer, "model.optimizer"
        )
        self.loss_config: LossConfig = validate_model(LossConfig, loss, "model.loss")
        if self.loss_config.mode not in self.loss_modes:
            raise ConfigError(
                "model.loss.mode",
                f"is {self.loss_config.mode!r}, but {type(self).__name__} trains "
                f"{' or '.join(self.loss_modes)}",
                f"set it to {' or '.join(self.loss_modes)} (variants train locally only), or "
                "let sae-lightning fit pick the module for the mode",
            )
        spec = SAESpec(d_in, d_sae, encoder, decoder, sparsity)
        self.sae = SparseAutoencoder.from_spec(spec)
        self.plugin_versions = {
            role: _plugin_version(group, spec) for role, group, spec in spec.roles()
        }
        # Tokens since each latent last fired; part of the checkpoint for exact resume.
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        self.counter_bound = CounterBound(self.tokens_since_fired)
        keep_counters_out_of_ddp_sync(self)
        self.dead_key = dead_fraction_key(self.loss_config.dead_window_tokens)
        self.val_fvu = FractionOfVarianceUnexplained(d_in)
        self.val_l0 = MeanMetric()
        self.val_mse = MeanMetric()
        self.val_density = FeatureDensity(d_sae)
        self.val_rel_l2 = MeanMetric()

    def members(self) -> dict[str, SAEModule]:
        """The SAEs this module trains, by log prefix (``""``: just this one)."""
        return {"": self}

    def configure_data_module(self, datamodule: pl.LightningDataModule) -> None:
        """Adapt ``datamodule`` to this module's training batches before its setup (default:
        nothing; the e2e module switches language-model data to token batches)."""

    def gathered_sae(self) -> SparseAutoencoder:
        """The whole SAE as one module, for export (default: :attr:`sae` itself; a module that
        shards it gathers it, a collective every rank must call)."""
        return self.sae

    # ---- training -------------------------------------------------------------------------

    def dead_mask(self, window_tokens: int | None = None) -> Tensor:
        """``(d_sae,)`` bool: latents that have not fired in the last ``window_tokens``.

        Args:
            window_tokens: the window; default ``loss.dead_window_tokens``.
        """
        window = self.loss_config.dead_window_tokens if window_tokens is None else window_tokens
        return self.tokens_since_fired >= window

    def reconstruction_loss(self, x: Tensor, x_hat: Tensor, diff: Tensor | None = None) -> Tensor:
        """This rank's reconstruction term (averaged over ranks: the global-batch value).

        On function batches ``mse`` and ``fvu`` treat every grid point as a row (a quadrature
        mean, so values agree across resolutions) and ``rel_l2`` is the mean over samples of
        ``||u - u_hat||^2 / ||u||^2``.

        Args:
            x: the input batch.
            x_hat: its reconstruction.
            diff: ``x - x_hat`` when the caller already has it.
        """
        diff = x - x_hat if diff is None else diff
        mode = self.loss_config.reconstruction
        if mode == "fvu":
            return diff.pow(2).sum() / total_variance_share(x).clamp_min(1e-12)
        if mode == "rel_l2":
            return (l2_norm_sq(diff) / l2_norm_sq(x.detach()).clamp_min(1e-12)).mean()
        return as_points(diff).pow(2).sum(dim=1).mean()

    def training_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int) -> dict[str, Any]:
        out = self.compute_step(as_tensor(batch), step=self.global_step)
        self.log_metrics(out.metrics)
        return {"loss": out.loss, "terms": {k: v.detach() for k, v in out.terms.items()}}

    def compute_step(self, x: Tensor, *, step: int) -> StepOutput:
        """Loss, terms and metrics of one batch; advances the dead-latent counters.

        Under DDP every rank must call it (it holds collectives).
        """
        dead = self.dead_mask()
        window = self.loss_config.dead_window_tokens
        at_most = self.counter_bound.at_most_dead(self.tokens_since_fired, window)
        out = self.sae.run(x, step=step, dead=DeadLatents(dead, at_most))
        diff = x - out.x_hat  # computed once: loss, AuxK residual and metrics share it
        recon = self.reconstruction_loss(x, out.x_hat, diff)
        residual = diff.detach()
        aux = self.sae.auxiliary_losses(out.aux_source, x, residual, dead)
        terms = {"reconstruction": recon, **out.penalties, **aux}
        loss = torch.stack([t.float() for t in terms.values()]).sum()
        metrics = core_metrics(loss, terms, out.codes)
        if is_function_batch(x):
            metrics["train/rel_l2"] = relative_l2_of_residual(x, residual).mean()
        metrics = self.finish_step_metrics(
            metrics, as_points(x), as_points(residual), x.shape[0], out.codes
        )
        return StepOutput(loss, terms, metrics)

    @torch.no_grad()
    def finish_step_metrics(
        self, metrics: dict[str, Tensor], x: Tensor, residual: Tensor, n_samples: int, codes: Codes
    ) -> dict[str, Tensor]:
        """Global metrics of a step (FVU and the dead fraction added); advances the dead-latent
        counters. Under DDP every rank must call it (one all-reduce).

        Args:
            metrics: this rank's metrics (:func:`~sae_lightning.step_metrics.core_metrics`...).
            x: ``(rows, d_in)`` the SAE's inputs this step; residual: ``x - x_hat``.
            n_samples: this rank's samples (tokens, or functions).
            codes: this step's codes.
        """
        stats = global_step_statistics(metrics, x, residual, n_samples, codes.fire_counts())
        on_host = n_samples * data_parallel_world_size()  # DDP: equal batches (checked on reads)
        self._update_dead_counters(stats.fire_counts, stats.n_samples, on_host)
        return {**stats.metrics, self.dead_key: self.dead_mask().float().mean()}

    def log_metrics(self, metrics: dict[str, Tensor]) -> None:
        """Log a step's metrics (already global, so no further sync).

        Only on the steps whose metrics reach the logger (:func:`~sae_lightning.cadence.logs_step`):
        on the others Lightning would drop them, after paying for each ``self.log`` call. None is
        a progress-bar value (``prog_bar=True`` values are read on the host after every step);
        the bar (:class:`~sae_lightning.callbacks.progress.LoggedMetricsBar`) shows the logged
        ones, refreshed on the same cadence.
        """
        if not logs_step(self.trainer, self.global_step):
            return
        self.refresh_dead_bound()
        for key, value in metrics.items():
            self.log(key, value)

    def refresh_dead_bound(self) -> None:
        """Read the dead-latent counters on the host (on a logging step, where the logger reads
        anyway), so that AuxK's fused selection is as wide as the latents that can be dead."""
        if type(self.tokens_since_fired) is Tensor:  # not sharded
            self.counter_bound.read(self.tokens_since_fired, self.tokens_seen)

    @torch.no_grad()
    def _update_dead_counters(
        self, fire_counts: Tensor, n_tokens: int | Tensor, on_host: int
    ) -> None:
        """Advance the counters by ``n_tokens`` (the step's global token count, on the device
        under DDP); ``on_host``: the same count as the host knows it."""
        intact = self.counter_bound.intact(self.tokens_since_fired)
        self.tokens_seen += n_tokens
        fired = fire_counts > 0
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)
        self.counter_bound.advance(self.tokens_since_fired, on_host if intact else None)

    @torch.no_grad()
    def resample_latents(
        self, ids: Tensor, directions: Tensor, encoder_norm: Tensor
    ) -> list[Touched]:
        """Re-initialise latents ``ids`` (Anthropic resampling) and restart their dead window.

        Args:
            ids: ``(n,)`` latent ids.
            directions: ``(n, d_in)`` unit-norm new directions.
            encoder_norm: the L2 norm of the new encoder rows, a scalar or ``(n, 1)``.

        Returns:
            Every parameter slice rewritten, for the caller to reset its optimizer state.
        """
        touched = self.sae.encoder.resample_rows(ids, directions, encoder_norm)
        touched += self.sae.decoder.resample_atoms(ids, directions)
        touched += self.sae.sparsity.resample_latents(ids)
        self.tokens_since_fired[ids] = 0
        return touched

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.sae.before_optimizer_step()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.sae.after_optimizer_step()

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        return build_optimizer([(params, self.optimizer_config)], self.trainer)

    def configure_callbacks(self) -> list[pl.Callback]:
        return terminate_ranks_on_error(self.trainer)

    # ---- evaluation -----------------------------------------------------------------------

    def validation_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int) -> None:
        self.update_validation(as_tensor(batch), step=self.global_step)

    def update_validation(self, x: Tensor, *, step: int) -> None:
        """Accumulate the validation metrics of one batch (torchmetrics, synced over ranks)."""
        out = self.sae.run(x, step=step)
        points, points_hat = as_points(x), as_points(out.x_hat)
        self.val_fvu.update(points, points_hat)
        self.val_l0.update(out.codes.l0().float())
        self.val_mse.update((points - points_hat).pow(2).mean(dim=1))
        self.val_density.update(out.codes.fire_counts(), x.shape[0])
        if is_function_batch(x):
            self.val_rel_l2.update(relative_l2(x, out.x_hat))

    def validation_results(self) -> tuple[dict[str, Tensor], Tensor]:
        """``({"val/...": value}, per-latent density)`` over all ranks; resets the metrics."""
        val_fvu = self.val_fvu.compute()
        density = self.val_density.compute()
        results = {
            "val/fvu": val_fvu,
            "val/explained_variance": 1 - val_fvu,
            "val/l0": self.val_l0.compute(),
            "val/mse": self.val_mse.compute(),
            "val/dead_fraction_eval": (density == 0).float().mean(),
        }
        if self.val_rel_l2.update_count > 0:  # function data only
            results["val/rel_l2"] = self.val_rel_l2.compute()
        for metric in (self.val_fvu, self.val_l0, self.val_mse, self.val_density, self.val_rel_l2):
            metric.reset()
        return results, density

    def on_validation_epoch_end(self) -> None:
        results, density = self.validation_results()
        for key, value in results.items():
            # Already reduced by torchmetrics; sync_dist only averages equal values (and keeps
            # Lightning from warning that epoch-level metrics are unsynchronised).
            self.log(key, value, sync_dist=True)
        log_density_histogram(self, density)

    # ---- checkpoints ----------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from sae_lightning._version import __version__

        checkpoint[CHECKPOINT_KEY] = {"version": __version__, "plugins": self.plugin_versions}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Refuse, or migrate, state written by other plugin state versions before it is loaded.
        plugins = {"encoder": self.sae.encoder, "decoder": self.sae.decoder}
        plugins["sparsity"] = self.sae.sparsity
        migrate_checkpoint(checkpoint, self.plugin_versions, plugins)


def log_density_histogram(module: pl.LightningModule, density: Tensor, prefix: str = "") -> None:
    """log10 feature density to TensorBoard (rank 0) under ``<prefix>val/``; never-firing
    latents sit at -10."""
    if isinstance(module.logger, TensorBoardLogger) and module.trainer.is_global_zero:
        module.logger.experiment.add_histogram(
            f"{prefix}val/feature_density_log10",
            torch.log10(density.clamp_min(1e-10)).cpu(),
            module.global_step,
        )


def as_tensor(batch: Tensor | tuple[Tensor, ...] | list[Tensor]) -> Tensor:
    """The input tensor of a batch (a bare tensor, or the first item of a tuple or list)."""
    return batch[0] if isinstance(batch, tuple | list) else batch


def _plugin_version(group: str, spec: PluginSpec) -> dict[str, Any]:
    name, _ = split_spec(spec, group)
    found = registry.resolve(group, name)
    return {
        "name": found.name,
        "distribution": found.dist,
        "version": found.version,
        "state_version": int(registry.get(group, name).state_version),
    }
