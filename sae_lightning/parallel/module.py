"""The LightningModule of a latent-sharded SAE (``trainer.strategy: model_parallel``).

It is the one-SAE :class:`~sae_lightning.module.SAEModule` with three things changed:
``configure_model`` (called by Lightning's ``ModelParallelStrategy`` once the device mesh
exists) shards the per-latent parameters and the dead-latent counters over the
``tensor_parallel`` dimension; the training step runs the sharded forward of
:mod:`.sharded`; and gradients are averaged over the ``data_parallel`` dimension before the
optimizer step, as DDP averages them. Loss terms are each data-parallel rank's share, exactly
as under DDP (see the docstring of :mod:`sae_lightning.module`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from sae_lightning.module import SAEModule, StepOutput
from sae_lightning.parallel.comm import all_gather, all_reduce
from sae_lightning.parallel.mesh import ShardLayout, shard_layout
from sae_lightning.parallel.resampling import ShardedView
from sae_lightning.parallel.sharded import (
    check_shardable,
    local,
    shard_parameters,
    sharded_auxk,
    sharded_run,
    variance_share,
)
from sae_lightning.sae import SparseAutoencoder


class ShardedSAEModule(SAEModule):
    """An :class:`SAEModule` whose latents are split over the tensor-parallel ranks.

    Takes the arguments of :class:`SAEModule`.

    Raises:
        ConfigError: a plugin the sharded forward does not implement.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_shardable(self.sae)
        self.layout: ShardLayout | None = None
        # Dead latents over all shards after the last step, kept on the device: read on the
        # host only when AuxK needs the number.
        self._n_dead: Tensor | None = None
        self._atoms: Tensor | None = None  # the whole dictionary, during validation only

    def configure_model(self) -> None:
        if self.layout is not None:
            return
        layout = shard_layout(self.device_mesh, self.sae.d_sae)
        shard_parameters(self.sae, layout)
        rows = slice(layout.offset, layout.offset + layout.shard_size)
        counters = self.tokens_since_fired[rows].clone()
        self.tokens_since_fired = DTensor.from_local(
            counters, layout.mesh, [Replicate(), Shard(0)], run_check=False
        )
        self.layout = layout
        self.sae.atoms = self._gathered_atoms  # type: ignore[method-assign]

    def resampling_view(self) -> ShardedView:
        """What the resampler reads and writes of this SAE, shard by shard (collectives)."""
        assert self.layout is not None, "configure_model() has not run"
        return ShardedView(self, self.layout)

    def _gathered_atoms(self) -> Tensor:
        if self._atoms is None:
            raise RuntimeError(
                "the sharded dictionary is gathered whole only during validation on data with "
                "ground-truth atoms; use gathered_sae() (every rank) for the whole SAE"
            )
        return self._atoms

    def on_validation_epoch_start(self) -> None:
        # The synthetic data's reference metrics and atom images (rank 0 only) read the whole
        # dictionary: gather it here, where every rank takes part. Such dictionaries are small.
        from sae_lightning.callbacks.reference_metrics import ReferenceMetricsData

        has_atoms = isinstance(self.trainer.datamodule, ReferenceMetricsData)
        self._atoms = self.sae.decoder.W_dec.detach().full_tensor() if has_atoms else None

    # ---- training -------------------------------------------------------------------------

    def dead_mask(self, window_tokens: int | None = None) -> Tensor:
        """``(d_sae,)`` bool over all latents (gathered from the shards: every rank calls it)."""
        assert self.layout is not None
        shard = self._dead_local(window_tokens)
        return torch.cat(all_gather(shard, self.layout.tp_group, "tp"))

    def _dead_local(self, window_tokens: int | None = None) -> Tensor:
        window = self.loss_config.dead_window_tokens if window_tokens is None else window_tokens
        return local(self.tokens_since_fired) >= window

    @torch.no_grad()
    def restart_dead_windows(self, rows: Tensor) -> None:
        """Restart the dead-latent counters of this shard's ``rows`` (local ids; resampled).

        The dead count over all shards is then recounted at the next step (one all-reduce).
        """
        local(self.tokens_since_fired)[rows] = 0
        self._n_dead = None

    def _dead_count(self) -> int:
        if self._n_dead is None:
            assert self.layout is not None
            count = self._dead_local().sum().view(1)
            self._n_dead = all_reduce(count, self.layout.tp_group, "tp")[0]
        return int(self._n_dead.item())

    def compute_step(self, x: Tensor, *, step: int) -> StepOutput:
        """Loss, terms and metrics of this rank's rows; advances the dead-latent counters.

        Every rank of the mesh must call it (it holds collectives).
        """
        layout = self.layout
        assert layout is not None, "configure_model() has not run"
        out = sharded_run(self.sae, x, layout, step=step, training=True)
        diff = x - out.x_hat
        residual = diff.detach()
        variance: Tensor | None = None
        if self.loss_config.reconstruction == "fvu":
            variance = variance_share(x, layout)
            recon = diff.pow(2).sum() / variance.clamp_min(1e-12)
        else:
            recon = self.reconstruction_loss(x, out.x_hat, diff)
        aux: dict[str, Tensor] = {}
        if self.sae.sparsity.auxiliary_loss_switch is not None:
            n_dead = self._dead_count()
            if n_dead and variance is None:
                variance = variance_share(x, layout)
            aux = sharded_auxk(
                self.sae, out.pre_acts, residual, self._dead_local(), n_dead,
                variance if variance is not None else x.new_ones(()), layout,
            )  # fmt: skip
        terms = {"reconstruction": recon, **out.penalties, **aux}
        loss = torch.stack([t.float() for t in terms.values()]).sum()
        with torch.no_grad():
            metrics = {"train/loss": loss.detach()}
            metrics.update({f"train/loss/{k}": v.detach().float() for k, v in terms.items()})
            metrics = self._reduce(x, residual, out.active, out.fire_counts, metrics)
        return StepOutput(loss, terms, metrics)

    @torch.no_grad()
    def _reduce(
        self, x: Tensor, residual: Tensor, active: Tensor, fire_counts: Tensor, metrics: dict
    ) -> dict[str, Tensor]:
        """Global metrics and dead counters: one all-reduce over the data-parallel group (the
        metrics, batch FVU sums, this shard's fire counts) and one over the tensor-parallel
        group (active latents and dead latents of each shard)."""
        layout = self.layout
        assert layout is not None
        x64 = x.double()
        names = list(metrics)
        n = len(names)
        packed = torch.cat(
            [
                torch.stack([metrics[k].double() for k in names]) / layout.dp_size,
                residual.double().pow(2).sum().view(1),
                x64.pow(2).sum().view(1),
                x64.new_tensor([x.shape[0]]),
                active.double().sum().view(1),
                fire_counts.double(),
                x64.sum(dim=0),
            ]
        )
        all_reduce(packed, layout.dp_group, "dp")
        sq_err, sum_sq, rows, n_active = packed[n : n + 4]
        counts = packed[n + 4 : n + 4 + fire_counts.numel()].round().long()
        sum_x = packed[n + 4 + fire_counts.numel() :]
        n_tokens = rows.round().long()
        self.tokens_seen += n_tokens
        counters = local(self.tokens_since_fired)
        counters.add_(n_tokens).masked_fill_(counts > 0, 0)
        shard = torch.stack([n_active, self._dead_local().sum().double()])
        all_reduce(shard, layout.tp_group, "tp")
        self._n_dead = shard[1].round().long()
        reduced = {k: packed[i].float() for i, k in enumerate(names)}
        variance = (sum_sq - sum_x.pow(2).sum() / rows).clamp_min(1e-12)
        reduced["train/fvu"] = (sq_err / variance).float()
        reduced["train/l0"] = (shard[0] / rows).float()
        reduced[self.dead_key] = (shard[1] / layout.d_sae).float()
        return reduced

    def on_after_backward(self) -> None:
        """Average the gradients over the data-parallel group (one all-reduce), as DDP does,
        before any callback or the optimizer reads them."""
        layout = self.layout
        assert layout is not None
        if layout.dp_size > 1:
            grads = [local(p.grad) for p in self.parameters() if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            all_reduce(flat, layout.dp_group, "dp").div_(layout.dp_size)
            for g, g_flat in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                g.copy_(g_flat.view_as(g))

    # ---- evaluation -----------------------------------------------------------------------

    def update_validation(self, x: Tensor, *, step: int) -> None:
        """Accumulate the validation metrics of one batch from the sharded forward."""
        layout = self.layout
        assert layout is not None
        out = sharded_run(self.sae, x, layout, step=step, training=False)
        active = all_reduce(out.active.clone(), layout.tp_group, "tp")
        fire_counts = torch.cat(all_gather(out.fire_counts, layout.tp_group, "tp"))
        self.val_fvu.update(x, out.x_hat)
        self.val_l0.update(active.float())
        self.val_mse.update((x - out.x_hat).pow(2).mean(dim=1))
        self.val_density.update(fire_counts, x.shape[0])

    # ---- export ---------------------------------------------------------------------------

    @torch.no_grad()
    def gathered_sae(self) -> SparseAutoencoder:
        """The whole SAE as an ordinary one-device module (every rank must call it)."""
        sae = self.sae
        plain = SparseAutoencoder(sae.d_in, sae.d_sae, **sae.specs)
        state = {
            k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in sae.state_dict().items()
        }
        plain.load_state_dict(state)
        return plain

    def parameter_bytes(self) -> int:
        """Bytes of this rank's parameters and optimizer state (its shards)."""
        total = sum(local(p).numel() * p.element_size() for p in self.parameters())
        for optimizer in self.trainer.optimizers:
            for state in optimizer.state.values():
                for value in state.values():
                    if isinstance(value, Tensor) and value.ndim > 0:
                        total += local(value).numel() * value.element_size()
        return total
