"""Resolution transfer: one trained SAE evaluated on the same validation functions at many grids.

A function-space SAE (SAE-FNO) is trained at one grid but its weights define operators on
functions, so it should reconstruct the same samples rendered at 2x or 4x the points about as
well; a grid-bound SAE (SAE-CNN, whose kernels are sized in grid points) should not. The callback
asks the data module to render its validation samples at every test resolution
(``validation_set(grid) -> (u, support)``, the function-synthetic and PDE data modules do) and
logs, through ``pl_module.log`` so that the values reach TensorBoard and the run's
``metrics.json``:

- ``val/rel_l2@N``: mean over samples of ``||u - u_hat|| / ||u||`` (quadrature L2) at N points
  per axis;
- ``val/mmcs@N``: when the data knows its true concepts (``true_concepts(grid)``), the mean max
  cosine similarity after Hungarian matching between them and the decoder's
  ``concept_functions(grid)`` (shift-aware for convolutional decoders).

A resolution the SAE cannot run at (a grid-bound decoder, too few points for the kept Fourier
modes) is skipped with a one-line note. Because ``sae-lightning fit`` ends with one more
validation and ``sae-lightning validate`` runs one, the keys land in ``metrics.json`` of every
run that lists the callback.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from pydantic import Field
from torch import Tensor
from typing_extensions import override

from sae_lightning.callbacks.schedule import EveryNValidations, ScheduledCallback
from sae_lightning.config import PluginConfig
from sae_lightning.errors import ConfigError
from sae_lightning.functional import relative_l2


class ResolutionTransferConfig(PluginConfig):
    resolutions: list[int] = Field(
        default_factory=lambda: [32, 64, 128],
        min_length=1,
        description="test grids, in points per axis (every axis of the data's grid gets N)",
    )
    max_samples: int | None = Field(
        256, gt=0, description="evaluate on the first this many validation samples (None: all)"
    )
    batch_size: int = Field(64, gt=0, description="samples per SAE forward pass")
    mmcs: bool = Field(
        True, description="also log val/mmcs@N when the data module knows its true concepts"
    )
    every_n_validations: int = Field(
        1,
        gt=0,
        description="during fit, evaluate at every n-th validation; `validate` (also the one "
        "that ends `fit`) always evaluates",
    )


def rel_l2_key(n: int) -> str:
    """``val/rel_l2@<n>``."""
    return f"val/rel_l2@{n}"


def mmcs_key(n: int) -> str:
    """``val/mmcs@<n>``."""
    return f"val/mmcs@{n}"


def data_dims(datamodule: Any) -> int:
    """Number of grid axes of the data (1 or 2), from ``train_grid`` or a validation batch.

    Raises:
        ConfigError: naming ``data`` when the data module yields no function batches.
    """
    grid = getattr(datamodule, "train_grid", None)
    if grid is not None:
        return len(tuple(grid))
    batch = next(iter(datamodule.val_dataloader()))
    x = batch[0] if isinstance(batch, tuple | list) else batch
    if x.ndim < 3:
        raise ConfigError(
            "data",
            f"yields vectors {tuple(x.shape)}, but resolution_transfer needs function batches "
            "(batch, channels, *grid)",
            "use a function data module (function_synthetic, pde_fields, fno_activations)",
        )
    return x.ndim - 2


@torch.no_grad()
def evaluate_at(sae: torch.nn.Module, u: Tensor, batch_size: int, device: torch.device) -> float:
    """Mean relative L2 error of ``sae`` on the function batch ``u`` (run in chunks).

    Raises:
        ValueError, RuntimeError: the SAE cannot run at ``u``'s grid (its own message).
    """
    errors = []
    for chunk in u.split(batch_size):
        x = chunk.to(device)
        x_hat = sae.run(x).x_hat
        if x_hat.shape != x.shape:
            raise ValueError(
                f"reconstruction has shape {tuple(x_hat.shape)}, input {tuple(x.shape)}"
            )
        errors.append(relative_l2(x.double(), x_hat.double()))
    return float(torch.cat(errors).mean())


@torch.no_grad()
def concept_mmcs(sae: torch.nn.Module, true: Tensor, grid: tuple[int, ...]) -> float:
    """MMCS between true concepts and the decoder's ``concept_functions(grid)``.

    Raises:
        ValueError: the decoder cannot render its concepts on ``grid`` (its own message).
    """
    from sae_neural_operator.recovery import functional_mmcs

    decoder = sae.decoder
    learned = decoder.concept_functions(grid).detach().double().cpu()
    shift_aware = bool(getattr(decoder, "convolutional", False))
    return functional_mmcs(true.double().cpu(), learned, shift_aware=shift_aware).mmcs


class ResolutionTransfer(ScheduledCallback):
    """Log val/rel_l2@N (and val/mmcs@N) on the same validation samples at each grid N.

    Args:
        config: validated :class:`ResolutionTransferConfig`.
    """

    Config = ResolutionTransferConfig

    def __init__(self, config: ResolutionTransferConfig) -> None:
        self.config = config
        self.schedule = EveryNValidations(config.every_n_validations)
        self.noted: set[tuple[str, int]] = set()
        self._cache: dict[tuple[int, ...], Tensor] = {}

    def _note(self, what: str, n: int, reason: str) -> None:
        """One line per (metric, resolution) per run, not one per validation."""
        if (what, n) not in self.noted:
            self.noted.add((what, n))
            first = reason.strip().splitlines()[0] if reason.strip() else "no reason given"
            rank_zero_info(f"resolution_transfer: skipping {what}@{n}: {first}")

    def _samples(self, datamodule: Any, grid: tuple[int, ...]) -> Tensor:
        """The validation samples rendered at ``grid`` (cached: the data are deterministic)."""
        if grid not in self._cache:
            u, _support = datamodule.validation_set(grid)
            if self.config.max_samples is not None:
                u = u[: self.config.max_samples]
            self._cache[grid] = u.detach().cpu()
        return self._cache[grid]

    @torch.no_grad()
    def evaluate(
        self, sae: torch.nn.Module, datamodule: Any, device: torch.device | str = "cpu"
    ) -> dict[str, float]:
        """``{"val/rel_l2@N": ..., "val/mmcs@N": ...}`` for every resolution the SAE runs at.

        Resolutions it cannot run at are left out, with a one-line note the first time.

        Raises:
            ConfigError: naming ``data`` when the data module cannot render its validation
                samples at other grids (no ``validation_set(grid)``).
        """
        if not callable(getattr(datamodule, "validation_set", None)):
            raise ConfigError(
                "data",
                f"resolution_transfer needs a data module with validation_set(grid); "
                f"{type(datamodule).__name__} has none",
                "use function_synthetic, pde_fields or fno_activations data, or remove the "
                "resolution_transfer callback",
            )
        dims = data_dims(datamodule)
        true_concepts = getattr(datamodule, "true_concepts", None) if self.config.mmcs else None
        results: dict[str, float] = {}
        for n in self.config.resolutions:
            grid = (n,) * dims
            try:
                u = self._samples(datamodule, grid)
                results[rel_l2_key(n)] = evaluate_at(sae, u, self.config.batch_size, device)
            except (ValueError, RuntimeError) as err:
                self._note("rel_l2", n, str(err))
            if callable(true_concepts):
                try:
                    results[mmcs_key(n)] = concept_mmcs(sae, true_concepts(grid), grid)
                except (ValueError, RuntimeError) as err:
                    self._note("mmcs", n, str(err))
        return results

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.schedule.due(trainer):
            return
        for key, value in self.evaluate(
            pl_module.sae, trainer.datamodule, pl_module.device
        ).items():
            pl_module.log(key, value, sync_dist=True)  # equal on every rank: no-op average
