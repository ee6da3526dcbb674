"""Dead-latent resampling (Anthropic, "Towards Monosemanticity", 2023) as a callback.

At every ``every_n_steps`` training steps, at most ``max_resamples`` times:

1. dead latents are those that have not fired within ``dead_window_tokens`` training tokens
   (the module's ``tokens_since_fired`` counters, already reduced over ranks);
2. the candidates are the last ``n_candidates`` training inputs, collected in the steps just
   before; each is weighted by the square of the SAE's loss on it, ``(||x - x_hat||^2)^2``,
   computed with the current weights;
3. each dead latent draws one input with these weights (without replacement while enough
   inputs have a nonzero loss, so two latents do not get the same direction);
4. its decoder atom becomes the unit-norm direction, its encoder row the same direction with a
   new norm, its encoder bias 0; sparsity plugins reset their own per-latent state (JumpReLU:
   the threshold);
5. the optimizer state (Adam's ``exp_avg`` and ``exp_avg_sq``) of exactly those rows and
   entries is reset, and the latents' dead-window counters restart.

``procedure: anthropic`` (the default) is the published recipe for ReLU SAEs: the drawn input
as direction, encoder rows at ``encoder_norm_scale`` (0.2) x the mean live norm, both Adam
moments zeroed. ``procedure: topk`` is for the TopK family, where those rows never enter the
top k or, at full norm, fire too widely and are shut off: directions are centres of k-means
clusters of the candidates' residuals (seeded by the draws), each row's norm puts its cluster's
median input at that input's top-k threshold, and Adam's second moment starts at the mean of
the live rows instead of 0 (a zero second moment makes the first steps 3-6 x lr). See
docs/resampling.md for the measurements.

Under DDP the inputs of each collected step are all-gathered to rank 0 (in global batch
order, so the pool is the one a single process would see); rank 0 computes the losses, picks
the latents and inputs, and broadcasts ids, directions and norm; every rank then applies the
identical update. Under latent sharding (``trainer.strategy: model_parallel``) the pool takes
one copy of each data-parallel rank's rows; at a resample it is broadcast, and every rank scores
it through the sharded forward (:mod:`.resampling_view`: dead masks and row norms gathered from
the shards), so the draws are those of one process; each rank writes the rows of its own shard
and resets their Adam state. Plugins take part through ``Encoder.resample_rows``,
``Decoder.resample_atoms`` and the optional ``SparsityFn.resample_latents``
(:mod:`sae_lightning.components.base`); see docs/resampling.md.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from pydantic import Field
from torch import Tensor
from typing_extensions import override

from sae_lightning.callbacks.batch_end import BatchEndCallback, TrainBatchEnd
from sae_lightning.callbacks.resampling_init import (
    residual_clusters,
    squared_errors,
    threshold_norms,
)
from sae_lightning.callbacks.resampling_view import NewLatents, StateReset, resampling_view
from sae_lightning.components.base import supports_resampling
from sae_lightning.config import PluginConfig
from sae_lightning.errors import ConfigError
from sae_lightning.gather import gather_ranks
from sae_lightning.module import as_tensor
from sae_lightning.multi import MultiSAEModule
from sae_lightning.protocols import TrainsSAEs

log = logging.getLogger(__name__)


class DeadFeatureResamplerConfig(PluginConfig):
    every_n_steps: int = Field(
        25_000, gt=0, description="resample after every this many training steps (Anthropic: 25k)"
    )
    start_step: int = Field(
        0, ge=0, description="no resampling before this step (the first is the next multiple)"
    )
    max_resamples: int | None = Field(
        4, gt=0, description="stop after this many resamples (Anthropic: 4); null: never stop"
    )
    dead_window_tokens: int | None = Field(
        None,
        gt=0,
        description="dead means not fired in this many training tokens; "
        "default the model's loss.dead_window_tokens",
    )
    n_candidates: int = Field(
        65_536,
        gt=0,
        description="training inputs collected just before each resample, to draw new "
        "directions from (Anthropic: 819,200); held on rank 0's device",
    )
    encoder_norm_scale: float = Field(
        0.2, gt=0, description="new encoder rows get this x the mean norm of the live rows"
    )
    seed: int = Field(0, ge=0, description="seed of the input draws (combined with the step)")
    procedure: Literal["anthropic", "topk"] = Field(
        "anthropic",
        description="anthropic: Towards Monosemanticity (ReLU SAEs); topk: the variant for "
        "TopK/BatchTopK SAEs (docs/resampling.md); sets the three choices below",
    )
    direction: Literal["input", "residual", "residual_clusters"] | None = Field(
        None,
        description="new atoms: the drawn input (anthropic), its residual x - x_hat, or the "
        "centre of a k-means cluster of the candidates' residuals seeded by the draws (topk); "
        "null: the procedure's",
    )
    encoder_norm: Literal["mean_live", "threshold"] | None = Field(
        None,
        description="new encoder rows: encoder_norm_scale x the mean live norm (anthropic), or "
        "per latent the norm at which its cluster's median input reaches that input's top-k "
        "threshold (topk); null: the procedure's",
    )
    adam_second_moment: Literal["zero", "live_mean"] | None = Field(
        None,
        description="zero: reset both Adam moments (anthropic); live_mean: zero the first, set "
        "the second to the mean of the rows kept, so new rows take steps of the usual size "
        "rather than 3-6 x lr (topk); null: the procedure's",
    )

    @property
    def choices(self) -> tuple[str, str, str]:
        """``(direction, encoder_norm, adam_second_moment)`` with the procedure's defaults."""
        default = _PROCEDURES[self.procedure]
        return (
            self.direction or default[0],
            self.encoder_norm or default[1],
            self.adam_second_moment or default[2],
        )


_PROCEDURES = {
    "anthropic": ("input", "mean_live", "zero"),
    "topk": ("residual_clusters", "threshold", "live_mean"),
}


class DeadFeatureResampler(BatchEndCallback):
    """Resample dead latents toward badly reconstructed inputs (Anthropic 2023).

    Args:
        config: the schedule and procedure parameters; defaults when None.

    Raises:
        ConfigError: at setup, when the module or one of its plugins lacks the resampling
            interface.

    Example::

        resampler = DeadFeatureResampler(DeadFeatureResamplerConfig(every_n_steps=500))
        trainer = pl.Trainer(max_steps=2000, callbacks=[resampler])
    """

    Config = DeadFeatureResamplerConfig

    def __init__(self, config: DeadFeatureResamplerConfig | None = None) -> None:
        self.config = config if config is not None else DeadFeatureResamplerConfig()
        self.n_resamples = 0
        self.total_resampled = 0
        self.last_step = -1
        self._chunks: list[Tensor] = []  # candidate inputs, oldest first (rank 0 only)
        self._replica_ranks: Tensor | None = None  # see _replicas
        self._is_zero = True
        # SAEs spread over processes (trainer.distribute_saes): every process reads whole
        # batches and resamples its own SAEs from its own pool, as one process would.
        self._independent = False

    # ---- checks ---------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._is_zero = trainer.is_global_zero
        if stage != "fit":
            return
        distributed = isinstance(pl_module, MultiSAEModule) and pl_module.distribute
        self._independent = distributed and trainer.world_size > 1
        if not isinstance(pl_module, TrainsSAEs):
            raise ConfigError(
                "callbacks",
                f"the resampler needs a module with members() (SAEModule or MultiSAEModule); "
                f"got {type(pl_module).__name__}",
                "remove the resampler callback, or train an SAEModule",
            )
        for name, member in pl_module.members().items():
            missing = supports_resampling(member.sae.encoder, member.sae.decoder)
            if missing:
                where = f" (SAE '{name}')" if name else ""
                raise ConfigError(
                    "callbacks",
                    f"the resampler cannot re-initialise latents{where}: "
                    f"{', '.join(missing)} not implemented",
                    "use the linear encoder with the linear or tied decoder, implement the "
                    "resampling interface (docs/resampling.md), or remove the resampler",
                )

    # ---- schedule -------------------------------------------------------------------------

    def _finished(self) -> bool:
        limit = self.config.max_resamples
        return limit is not None and self.n_resamples >= limit

    def _next_resample_step(self, done: int) -> int:
        """The first multiple of ``every_n_steps`` at or after ``done`` and ``start_step``, and
        not yet resampled."""
        every = self.config.every_n_steps
        first = max(done, self.config.start_step, 1)
        target = (first + every - 1) // every * every
        return target + every if target == self.last_step else target

    @override
    def after_train_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, end: TrainBatchEnd
    ) -> None:
        if self._finished():
            return
        done = end.step + 1  # optimizer steps taken, this batch's included
        target = self._next_resample_step(done)
        x = as_tensor(end.batch)
        global_rows = x.shape[0] * _data_parallel_size(trainer)
        window = -(-self.config.n_candidates // global_rows)  # steps whose inputs we keep
        if target - done < window:
            self._collect(trainer, pl_module, x.detach())
        if done == target:
            self._resample(trainer, pl_module, done)

    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Tensor) -> None:
        if trainer.world_size > 1 and not self._independent:
            # (world, B, d_in) -> (replicas * B, d_in), in global batch order
            x = gather_ranks(x)[self._replicas(trainer, x.device)].reshape(-1, x.shape[-1])
        if not (trainer.is_global_zero or self._independent):
            return
        self._chunks.append(x.clone())
        # Drop whole chunks that fall entirely before the last n_candidates rows.
        while self._chunks and sum(c.shape[0] for c in self._chunks[1:]) >= (
            self.config.n_candidates
        ):
            self._chunks.pop(0)

    def _replicas(self, trainer: pl.Trainer, device: torch.device) -> Tensor | slice:
        """The ranks whose rows make the global batch, one per data-parallel rank in its order:
        all of them under DDP; under latent sharding the ranks of a tensor-parallel group hold
        the same rows, so one of each (found once, with one small all-gather)."""
        sampler = trainer.distributed_sampler_kwargs
        if sampler is None or sampler["num_replicas"] == trainer.world_size:
            return slice(None)
        if self._replica_ranks is None:
            ranks = gather_ranks(torch.tensor(sampler["rank"], device=device)).cpu()
            first = [int((ranks == r).nonzero()[0, 0]) for r in range(sampler["num_replicas"])]
            self._replica_ranks = torch.tensor(first)
        return self._replica_ranks

    # ---- resampling -----------------------------------------------------------------------

    def _resample(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        members: dict[str, Any] = pl_module.members()  # type: ignore[operator]
        views = {name: resampling_view(member) for name, member in members.items()}
        # A sharded SAE's reads are collectives: then every rank scores the same candidates
        # (rank 0's, broadcast) and takes the same draws; rank 0's plan is broadcast either way.
        collective = any(view.collective for view in views.values())
        plan: dict[str, tuple[Tensor, Tensor, Tensor]] | None = None
        if collective or trainer.is_global_zero or self._independent:
            candidates = self._candidates(torch.device("cpu"))
            if collective and not self._independent:
                candidates = trainer.strategy.broadcast(candidates, src=0)
            if candidates is not None:
                candidates = candidates.to(pl_module.device)
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
            plan = {
                name: self.choose(member, candidates, generator) for name, member in members.items()
            }
        if not self._independent:
            plan = trainer.strategy.broadcast(plan, src=0)
        assert plan is not None
        self._chunks.clear()
        self.n_resamples += 1
        self.last_step = step
        for name, view in views.items():
            ids, directions, norm = (t.to(pl_module.device) for t in plan[name])
            if norm.ndim == 1:  # one norm per latent: (n, 1) scales the (n, d_in) rows
                norm = norm.unsqueeze(1)
            if ids.numel():
                reset = StateReset(trainer.optimizers, self.config.choices[2])
                view.resample(NewLatents(ids, directions, norm), reset)
        counts = {name: int(plan[name][0].numel()) for name in views}
        if self._independent:  # every process's SAEs, so rank 0 logs them all
            assert isinstance(pl_module, MultiSAEModule)
            counts = pl_module.from_every_process(counts)
        for name, n in counts.items():
            self.total_resampled += n
            self._log(trainer, pl_module, f"{name}/" if name else "", n, step)

    def _candidates(self, device: torch.device) -> Tensor | None:
        if not self._chunks:
            return None
        pool = torch.cat([c.to(device) for c in self._chunks])
        return pool[-self.config.n_candidates :]

    @torch.no_grad()
    def choose(
        self, member: Any, candidates: Tensor | None, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Pick the dead latents of one SAE, their new directions and encoder norms.

        Args:
            member: an :class:`~sae_lightning.module.SAEModule` (or one member of a multi-SAE
                module).
            candidates: ``(n, d_in)`` inputs to draw from, or None when none were collected.
            generator: CPU generator for the draws.

        Returns:
            ``(ids, directions, norm)`` on the CPU: ``(n_dead,)`` latent ids, ``(n_dead, d_in)``
            unit-norm directions and the norm of the new encoder rows: a scalar, or
            ``(n_dead,)`` with ``encoder_norm: threshold``. Empty ids when no latent is dead
            or there is nothing to draw from.
        """
        view = resampling_view(member)
        dead = view.dead_mask(self.config.dead_window_tokens)
        ids = dead.nonzero().squeeze(1).cpu()
        if ids.numel() == 0 or candidates is None or candidates.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, view.d_in), torch.zeros(())
        direction, encoder_norm, _ = self.config.choices
        norms = view.row_norms()
        alive = ~dead
        mean_alive = norms[alive].mean() if bool(alive.any()) else norms.mean()
        norm = (self.config.encoder_norm_scale * mean_alive).cpu()

        residuals = None  # (n, d_in) x - x_hat, when the procedure needs more than the errors
        if direction != "input" or encoder_norm == "threshold":
            residuals = (candidates - view.reconstruct(candidates)).float()
            errors = residuals.pow(2).sum(dim=1)
        else:
            errors = squared_errors(view, candidates)  # (n,)
        weights = errors.double().pow(2).cpu()
        if not bool(torch.isfinite(weights).all()) or float(weights.sum()) <= 0:
            weights = torch.ones_like(weights)  # nothing to prefer: draw uniformly
        replacement = int((weights > 0).sum()) < ids.numel()
        rows = torch.multinomial(weights, ids.numel(), replacement=replacement, generator=generator)
        rows = rows.to(candidates.device)
        if residuals is None or direction == "input":
            chosen = candidates[rows].float()
        else:
            chosen = residuals[rows]
            if direction == "residual_clusters":
                chosen = residual_clusters(residuals, errors.float(), chosen)
        directions = chosen / chosen.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if encoder_norm == "threshold":
            assert residuals is not None
            norm = threshold_norms(view, candidates, residuals, directions, mean_alive).cpu()
        return ids, directions.cpu(), norm

    def _log(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str, n: int, step: int
    ) -> None:
        key = f"{prefix}train/resampled"
        pl_module.log(key, float(n))
        # Lightning writes step metrics only every log_every_n_steps; a resample is rare and
        # must not be lost between two logging steps.
        every = trainer.log_every_n_steps
        if trainer.is_global_zero and every > 0 and step % every != 0:
            for logger in trainer.loggers:
                logger.log_metrics({key: float(n)}, step=step - 1)
        if trainer.is_global_zero:
            where = f" of SAE '{prefix.rstrip('/')}'" if prefix else ""
            log.info("resampled %d dead latents%s at step %d", n, where, step)

    # ---- checkpoint state -----------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        pool = torch.cat([c.cpu() for c in self._chunks]) if self._chunks else None
        return {
            "n_resamples": self.n_resamples,
            "total_resampled": self.total_resampled,
            "last_step": self.last_step,
            "candidates": pool,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.n_resamples = int(state_dict["n_resamples"])
        self.total_resampled = int(state_dict.get("total_resampled", 0))
        self.last_step = int(state_dict["last_step"])
        pool = state_dict.get("candidates")
        keep = self._is_zero or self._independent  # the pools of independent ranks are equal
        self._chunks = [pool] if pool is not None and keep else []


def _data_parallel_size(trainer: pl.Trainer) -> int:
    """Ranks that split each global batch: all under DDP, ``W / T`` under latent sharding."""
    sampler = trainer.distributed_sampler_kwargs
    return trainer.world_size if sampler is None else int(sampler["num_replicas"])
