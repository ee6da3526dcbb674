"""The one LightningModule: trains any registered encoder + sparsity + decoder.

Loss = reconstruction + the sparsity plugin's penalties + its auxiliary terms (e.g. AuxK), each
logged on its own under ``train/loss/<term>``. The module calls only the plugin protocols; the
hot path keeps counts as tensors and never synchronises with the host.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchmetrics import MeanMetric

from sae_lightning.config import LossConfig, OptimizerConfig, PluginSpec, split_spec, validate_model
from sae_lightning.metrics import (
    FeatureDensity,
    FractionOfVarianceUnexplained,
    dead_fraction_key,
    fvu,
)
from sae_lightning.registry import GROUPS, registry
from sae_lightning.sae import SparseAutoencoder

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


class SAEModule(pl.LightningModule):
    """Trains a :class:`SparseAutoencoder` composed from plugin specs.

    Args:
        d_in: input width.
        d_sae: number of latents.
        encoder, decoder, sparsity: plugin specs ``{"name": ..., **params}``.
        optimizer: :class:`~sae_lightning.config.OptimizerConfig` fields.
        loss: :class:`~sae_lightning.config.LossConfig` fields.
    """

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
        self.sae = SparseAutoencoder(d_in, d_sae, encoder, decoder, sparsity)
        self.plugin_versions = {
            role: _plugin_version(group, spec)
            for role, group, spec in (
                ("encoder", "encoders", encoder),
                ("decoder", "decoders", decoder),
                ("sparsity", "sparsity", sparsity),
            )
        }
        # Tokens since each latent last fired; part of the checkpoint for exact resume.
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        self.dead_key = dead_fraction_key(self.loss_config.dead_window_tokens)
        self.val_fvu = FractionOfVarianceUnexplained(d_in)
        self.val_l0 = MeanMetric()
        self.val_mse = MeanMetric()
        self.val_density = FeatureDensity(d_sae)

    # ---- training -------------------------------------------------------------------------

    def dead_mask(self) -> Tensor:
        """``(d_sae,)`` bool: latents that have not fired in the last ``dead_window_tokens``."""
        return self.tokens_since_fired >= self.loss_config.dead_window_tokens

    def reconstruction_loss(self, x: Tensor, x_hat: Tensor) -> Tensor:
        if self.loss_config.reconstruction == "fvu":
            return fvu(x, x_hat)
        return (x - x_hat).pow(2).sum(dim=1).mean()

    def training_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int) -> dict[str, Any]:
        x = _as_tensor(batch)
        out = self.sae.run(x, step=self.global_step)
        recon = self.reconstruction_loss(x, out.x_hat)
        residual = x - out.x_hat.detach()
        aux = self.sae.sparsity.auxiliary_losses(
            out.pre_acts, x, residual, self.sae.decoder, self.dead_mask()
        )
        terms = {"reconstruction": recon, **out.penalties, **aux}
        loss = torch.stack(list(terms.values())).sum()
        self._update_dead_counters(out.codes.fire_counts(), x.shape[0])

        with torch.no_grad():
            l0 = out.codes.l0().float().mean()
            batch_fvu = fvu(x, out.x_hat)
        self.log("train/loss", loss, prog_bar=True)
        for name, value in terms.items():
            self.log(f"train/loss/{name}", value)
        self.log("train/l0", l0, prog_bar=True)
        self.log("train/fvu", batch_fvu)
        self.log(self.dead_key, self.dead_mask().float().mean())
        return {"loss": loss, "terms": {k: v.detach() for k, v in terms.items()}}

    @torch.no_grad()
    def _update_dead_counters(self, fire_counts: Tensor, batch_size: int) -> None:
        n_tokens = batch_size
        if self.trainer.world_size > 1:  # every rank must agree on which latents are dead
            fire_counts = self.all_gather(fire_counts).sum(dim=0)
            n_tokens = batch_size * self.trainer.world_size
        self.tokens_seen += n_tokens
        fired = fire_counts > 0
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.sae.before_optimizer_step()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.sae.after_optimizer_step()

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optimizer_config
        params = [p for p in self.parameters() if p.requires_grad]
        fused = cfg.fused
        if fused is None:
            fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        opt_cls = torch.optim.AdamW if cfg.weight_decay > 0 else torch.optim.Adam
        optimizer = opt_cls(
            params,
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            fused=fused,
        )
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else None
        if total is None:
            total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"},
        }

    # ---- evaluation -----------------------------------------------------------------------

    def validation_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int) -> None:
        x = _as_tensor(batch)
        out = self.sae.run(x, step=self.global_step)
        self.val_fvu.update(x, out.x_hat)
        self.val_l0.update(out.codes.l0().float())
        self.val_mse.update((x - out.x_hat).pow(2).mean(dim=1))
        self.val_density.update(out.codes.fire_counts(), x.shape[0])

    def on_validation_epoch_end(self) -> None:
        val_fvu = self.val_fvu.compute()
        self.log("val/fvu", val_fvu, sync_dist=False)
        self.log("val/explained_variance", 1 - val_fvu, sync_dist=False)
        self.log("val/l0", self.val_l0.compute())
        self.log("val/mse", self.val_mse.compute())
        density = self.val_density.compute()
        self.log("val/dead_fraction_eval", (density == 0).float().mean())
        if isinstance(self.logger, TensorBoardLogger) and self.trainer.is_global_zero:
            # log10 feature density; never-firing latents sit at -10 so they stay visible.
            self.logger.experiment.add_histogram(
                "val/feature_density_log10",
                torch.log10(density.clamp_min(1e-10)).cpu(),
                self.global_step,
            )
        for metric in (self.val_fvu, self.val_l0, self.val_mse, self.val_density):
            metric.reset()

    # ---- checkpoints ----------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from sae_lightning import __version__

        checkpoint[CHECKPOINT_KEY] = {"version": __version__, "plugins": self.plugin_versions}


def _as_tensor(batch: Tensor | tuple[Tensor, ...] | list[Tensor]) -> Tensor:
    return batch[0] if isinstance(batch, tuple | list) else batch


def _plugin_version(group: str, spec: PluginSpec) -> dict[str, str]:
    name, _ = split_spec(spec, group)
    found = registry.resolve(group, name)
    assert group in GROUPS
    return {"name": found.name, "distribution": found.dist, "version": found.version}
