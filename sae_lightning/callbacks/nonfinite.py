"""Stops training at the first non-finite loss term or weight, before it reaches a checkpoint.

Every step adds its loss terms to a flag kept on the device (the first bad step, its terms and
their values), which costs a few small kernels and no host read. The flag and the weights are
read on logging steps (every ``trainer.log_every_n_steps``) and before every checkpoint is
written, so the run stops at most ``log_every_n_steps - 1`` steps after the first bad one, names
that step, and never checkpoints a diverged state.

Under DDP the decision is global and the error is shown once: the ranks' flags are gathered at
each check (the weights are identical on all ranks), rank 0 raises the error naming the ranks
whose terms were bad, and the other ranks wait for the job to be stopped (rank 0's
``TerminateRanksOnError`` kills them under Lightning's launcher; torchrun and
``srun --kill-on-bad-exit`` stop them when rank 0 exits) instead of printing the same error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from typing_extensions import override

from sae_lightning.cadence import every_n_steps, logs_step
from sae_lightning.callbacks.batch_end import BatchEndCallback, TrainBatchEnd
from sae_lightning.errors import NonFiniteError
from sae_lightning.gather import gather_ranks

_CAUSES = {
    "reconstruction": "inputs with NaN/Inf or huge norms, or a learning rate that is too high",
    "auxk": "a learning rate that is too high for the dead latents' encoder rows",
    "l1": "an L1 coefficient or learning rate that is too high",
    "l0": "a JumpReLU bandwidth that is too small for the input scale, or a high learning rate",
}


@dataclass
class _FirstBad:
    """Device-side record of the first step with a non-finite loss term (none: ``step < 0``)."""

    names: list[str]
    first_step: int
    """The step ``offset`` 0 stands for (a host int, so the step needs no device value)."""
    offset: Tensor
    """``()`` long: steps since ``first_step``."""
    step: Tensor
    """``()`` long: offset of the first bad step, -1 while every term was finite."""
    bad: Tensor
    """``(n_terms,)`` bool: the terms that were non-finite at that step."""
    values: Tensor
    """``(n_terms,)`` float32: the terms' values at that step."""

    @classmethod
    def start(cls, names: list[str], step: int, device: torch.device) -> _FirstBad:
        n = len(names)
        return cls(
            names=names,
            first_step=step,
            offset=torch.zeros((), dtype=torch.long, device=device),
            step=torch.full((), -1, dtype=torch.long, device=device),
            bad=torch.zeros(n, dtype=torch.bool, device=device),
            values=torch.zeros(n, dtype=torch.float32, device=device),
        )

    @torch.no_grad()
    def record(self, values: Tensor, step: int, last_step: int) -> None:
        """Add step ``step``'s terms; keeps the first bad step. No host read."""
        if step != last_step:
            self.offset += step - last_step
        bad = ~torch.isfinite(values)
        hit = bad.any() & (self.step < 0)
        self.step.copy_(torch.where(hit, self.offset, self.step))
        self.bad.copy_(torch.where(hit, bad, self.bad))
        self.values.copy_(torch.where(hit, values, self.values))

    def packed(self) -> Tensor:
        """``(2 + 2 n_terms,)`` float64: first bad offset, bad flags, values (for one gather)."""
        return torch.cat([self.step.double().view(1), self.bad.double(), self.values.double()])


class NonFiniteGuard(BatchEndCallback):
    """Raise :class:`NonFiniteError` naming the step and the loss term when training diverges.

    Each step's loss terms go into a device-side flag (no host sync); the flag and the weights
    are checked every ``every_n_steps`` steps and before every checkpoint is written, so the
    step that diverged, and any step after it, is never checkpointed: ``last.ckpt`` stays the
    last good state.

    Args:
        every_n_steps: how often to check; default ``trainer.log_every_n_steps``. Each check
            waits for the device (one host read) and, under DDP, gathers the flags of all ranks
            (one small all-gather).
        peer_wait_s: under DDP, how long a rank other than 0 waits to be stopped after rank 0
            raised, before it raises a short error of its own (a job no launcher tears down
            must not hang).
    """

    def __init__(self, every_n_steps: int | None = None, peer_wait_s: float = 60.0) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.peer_wait_s = peer_wait_s
        self._record: _FirstBad | None = None
        self._last_step = -1
        self._checked_step = -1

    def _due(self, trainer: pl.Trainer, step: int) -> bool:
        if self.every_n_steps is None:
            return logs_step(trainer, step)
        return every_n_steps(step, self.every_n_steps)

    @override
    def after_train_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, end: TrainBatchEnd
    ) -> None:
        step = end.step  # the step whose loss was just computed
        if isinstance(end.outputs, dict):
            terms: dict[str, Tensor] = end.outputs.get("terms", {"loss": end.outputs["loss"]})
            names = list(terms)
            values = torch.stack([terms[n].detach().float().reshape(()) for n in names])
            if self._record is not None and self._record.names != names:
                self._check(trainer, pl_module, self._last_step)  # before the terms change
                self._record = None
            if self._record is None:
                self._record = _FirstBad.start(names, step, values.device)
                self._last_step = step
            self._record.record(values, step, self._last_step)
            self._last_step = step
        if self._due(trainer, step):
            self._check(trainer, pl_module, step)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Called while the checkpoint is assembled, before anything is written.
        self._check(trainer, pl_module, trainer.global_step - 1)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, pl_module, trainer.global_step - 1)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record = None
        self._last_step = self._checked_step = -1

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Read the flag and the weights (one host read); raise if anything was non-finite."""
        if step == self._checked_step or step < 0:
            return
        self._checked_step = step
        # A latent-sharded parameter is checked shard by shard: each rank reads its own part.
        params = [
            (n, p.to_local() if isinstance(p, DTensor) else p)
            for n, p in pl_module.named_parameters()
        ]
        # One aminmax read per parameter: NaN and Inf reach min or max.
        extremes = torch.stack([torch.stack(torch.aminmax(p.detach())).float() for _, p in params])
        weights_ok = torch.isfinite(extremes).all().double().view(1)
        record = self._record
        flags = record.packed() if record is not None else extremes.new_full((1,), -1).double()
        packed = torch.cat([weights_ok.to(flags.device), flags])
        gathered = gather_ranks(packed)  # (world, 1 + 1 + 2 n_terms)
        host: list[list[float]] = gathered.tolist()  # the one host read of this check
        if all(rank[0] == 1 and rank[1] < 0 for rank in host):
            return
        if trainer.global_rank != 0:
            self._wait_for_rank_zero(step)
        if record is not None and any(rank[1] >= 0 for rank in host):
            raise _loss_error(record, [rank[1:] for rank in host], trainer.world_size)
        bad_params = [name for name, p in params if not bool(torch.isfinite(p).all())]
        raise NonFiniteError(
            f"non-finite weights after step {step}: {', '.join(bad_params)}; the loss was "
            "finite, so the optimizer update overflowed (lower model.optimizer.lr or raise "
            "model.optimizer.eps). The last checkpoint holds the last good state."
        )

    def _wait_for_rank_zero(self, step: int) -> None:
        """Rank 0 raises the error; give the launcher time to stop this rank silently."""
        time.sleep(self.peer_wait_s)
        raise NonFiniteError(
            f"stopped at step {step}: non-finite values (rank 0 reports them); this rank was "
            f"not stopped within {self.peer_wait_s:.0f} s of it"
        )


def _loss_error(record: _FirstBad, flags: list[list[float]], world_size: int) -> NonFiniteError:
    """The error naming the first bad step, its terms and ranks.

    Args:
        record: this rank's record (for the names and the step offset 0 stands for).
        flags: every rank's packed record (:meth:`_FirstBad.packed`), read on the host.
    """
    names, n = record.names, len(record.names)
    first = min(rank[0] for rank in flags if rank[0] >= 0)
    ranks = [r for r, rank in enumerate(flags) if rank[0] == first]
    bad = [name for i, name in enumerate(names) if any(flags[r][1 + i] > 0 for r in ranks)]
    shown = flags[ranks[0]][1 + n :]
    where = f" on rank(s) {', '.join(map(str, ranks))}" if world_size > 1 else ""
    causes = "; ".join(
        f"{name}: {_CAUSES.get(name.rsplit('/', 1)[-1], 'check its coefficient')}" for name in bad
    )
    return NonFiniteError(
        f"non-finite loss at step {record.first_step + int(first)} in term(s) {', '.join(bad)}"
        f"{where} ({', '.join(f'{name}={shown[names.index(name)]}' for name in bad)}). "
        f"Likely cause: {causes}. "
        "The last checkpoint holds the last good state; resume with a lower "
        "model.optimizer.lr via --ckpt_path last."
    )
