"""Stops training at the first non-finite loss term or weight, before it reaches a checkpoint.

Under DDP the decision is global and the error is shown once: every rank's loss terms are
gathered (the weights are identical on all ranks), rank 0 raises the error naming the ranks
whose terms were bad, and the other ranks wait for the job to be stopped (rank 0's
``TerminateRanksOnError`` kills them under Lightning's launcher; torchrun and
``srun --kill-on-bad-exit`` stop them when rank 0 exits) instead of printing the same error.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from sae_lightning.errors import NonFiniteError
from sae_lightning.gather import gather_ranks

_CAUSES = {
    "reconstruction": "inputs with NaN/Inf or huge norms, or a learning rate that is too high",
    "auxk": "a learning rate that is too high for the dead latents' encoder rows",
    "l1": "an L1 coefficient or learning rate that is too high",
    "l0": "a JumpReLU bandwidth that is too small for the input scale, or a high learning rate",
}


class NonFiniteGuard(pl.Callback):
    """Raise :class:`NonFiniteError` naming the step and the loss term when training diverges.

    It runs before Lightning's ModelCheckpoint (which always runs last), so the step that
    diverged is never checkpointed and ``last.ckpt`` stays the last good state.

    Args:
        every_n_steps: how often to check; each check waits for the device (one host sync)
            and, under DDP, gathers the loss terms of all ranks (one small all-gather).
        peer_wait_s: under DDP, how long a rank other than 0 waits to be stopped after rank 0
            raised, before it raises a short error of its own (a job no launcher tears down
            must not hang).
    """

    def __init__(self, every_n_steps: int = 1, peer_wait_s: float = 60.0) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.peer_wait_s = peer_wait_s

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not isinstance(outputs, dict) or (trainer.global_step - 1) % self.every_n_steps:
            return
        terms: dict[str, torch.Tensor] = outputs.get("terms", {"loss": outputs["loss"]})
        step = trainer.global_step - 1  # the step whose loss was just logged
        names = list(terms)
        # (world, n_terms): every rank's terms, so every rank takes the same decision.
        values = torch.stack([terms[n].detach().float().reshape(()) for n in names])
        values = gather_ranks(values)
        params = list(pl_module.named_parameters())
        # One aminmax read per parameter and a single host sync: NaN and Inf reach min or max.
        extremes = torch.stack([torch.stack(torch.aminmax(p.detach())).float() for _, p in params])
        finite = torch.stack([torch.isfinite(values).all(), torch.isfinite(extremes).all()])
        if bool(finite.all()):
            return
        if trainer.global_rank != 0:
            self._wait_for_rank_zero(step)
        bad_terms = ~torch.isfinite(values).cpu()  # (world, n_terms)
        if bool(bad_terms.any()):
            bad = [n for i, n in enumerate(names) if bool(bad_terms[:, i].any())]
            ranks = [r for r in range(bad_terms.shape[0]) if bool(bad_terms[r].any())]
            where = f" on rank(s) {', '.join(map(str, ranks))}" if trainer.world_size > 1 else ""
            shown = values[ranks[0]].cpu()
            causes = "; ".join(f"{n}: {_CAUSES.get(n, 'check its coefficient')}" for n in bad)
            raise NonFiniteError(
                f"non-finite loss at step {step} in term(s) {', '.join(bad)}{where} "
                f"({', '.join(f'{n}={float(shown[names.index(n)])}' for n in bad)}). "
                f"Likely cause: {causes}. "
                "The last checkpoint holds the last good state; resume with a lower "
                "model.optimizer.lr via --ckpt_path last."
            )
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
