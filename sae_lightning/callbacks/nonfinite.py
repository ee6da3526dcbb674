"""Stops training at the first non-finite loss term or weight, before it reaches a checkpoint."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from sae_lightning.errors import NonFiniteError

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
        every_n_steps: how often to check; each check waits for the device (one host sync).
    """

    def __init__(self, every_n_steps: int = 1) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps

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
        bad = [name for name, value in terms.items() if not bool(torch.isfinite(value).all())]
        if bad:
            causes = "; ".join(f"{n}: {_CAUSES.get(n, 'check its coefficient')}" for n in bad)
            raise NonFiniteError(
                f"non-finite loss at step {step} in term(s) {', '.join(bad)} "
                f"({', '.join(f'{n}={float(terms[n])}' for n in bad)}). Likely cause: {causes}. "
                "The last checkpoint holds the last good state; resume with a lower "
                "model.optimizer.lr via --ckpt_path last."
            )
        params = list(pl_module.named_parameters())
        # One aminmax read per parameter and a single host sync: NaN and Inf reach min or max.
        extremes = torch.stack([torch.stack(torch.aminmax(p.detach())).float() for _, p in params])
        if bool(torch.isfinite(extremes).all()):
            return
        bad_params = [name for name, p in params if not bool(torch.isfinite(p).all())]
        if bad_params:
            raise NonFiniteError(
                f"non-finite weights after step {step}: {', '.join(bad_params)}; the loss was "
                "finite, so the optimizer update overflowed (lower model.optimizer.lr or raise "
                "model.optimizer.eps). The last checkpoint holds the last good state."
            )
