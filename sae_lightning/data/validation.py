"""Checks every batch at the door: the right width, and finite values (fail, or drop and count)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from sae_lightning.errors import ConfigError, SaeLightningError

NonFinitePolicy = Literal["fail", "drop"]


class BadBatchError(SaeLightningError, ValueError):
    """A batch of activations cannot be trained on (wrong width or non-finite values)."""


class BatchValidator:
    """Validates ``(batch, d_in)`` activation batches (or ``(batch, d_in, *grid)`` function
    batches) as they reach the model.

    Args:
        d_in: the width every row must have.
        nonfinite: ``"fail"`` raises on the first NaN/Inf; ``"drop"`` removes those rows and
            counts them (``dropped_rows``, saved in the checkpoint).
        source: how to name the data in messages (a file, a DataModule).
    """

    def __init__(
        self, d_in: int, nonfinite: NonFinitePolicy = "fail", source: str = "data"
    ) -> None:
        self.d_in = d_in
        self.nonfinite = nonfinite
        self.source = source
        self.dropped_rows = 0

    def __call__(self, x: Tensor, batch_index: int) -> Tensor:
        if x.ndim < 2 or x.shape[1] != self.d_in:
            raise BadBatchError(
                f"{self.source}: batch {batch_index} has shape {tuple(x.shape)}, expected "
                f"(batch, {self.d_in}) or, for functions, (batch, {self.d_in}, *grid); "
                "set model.d_in to the data's width (channels) or fix the data"
            )
        if all_finite(x):
            return x
        finite = torch.isfinite(x).flatten(1).all(dim=1)  # (batch,)
        if bool(finite.all()):  # finite values whose sum overflowed
            return x
        bad = int((~finite).sum())
        if self.nonfinite == "fail":
            raise BadBatchError(
                f"{self.source}: batch {batch_index} has {bad} row(s) with NaN/Inf values; "
                "clean the data, or set data.nonfinite: drop to skip and count such rows"
            )
        self.dropped_rows += bad
        return x[finite]

    def state_dict(self) -> dict[str, Any]:
        return {"dropped_rows": self.dropped_rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dropped_rows = int(state.get("dropped_rows", 0))


def all_finite(x: Tensor) -> bool:
    """Whether every value of ``x`` is finite, from one read-only pass (its sum).

    A NaN or an infinity makes the sum non-finite, so a finite sum proves the batch clean. The
    converse fails only when finite values overflow the sum, which sends the caller to the
    exact per-row test. ``isfinite(x)`` instead writes masks as large as the batch, tens of
    times the time of the sum on a CPU, in the training thread, for every batch.
    """
    if not x.is_floating_point():
        return True
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(x.sum(dtype=wide)))


def require_min_samples(n: int, minimum: int, field: str) -> None:
    """Fail before training when a dataset is empty or smaller than one batch."""
    if n < minimum:
        raise ConfigError(
            field,
            f"has {n} sample(s), fewer than the {minimum} needed",
            "provide more data or lower the batch size",
        )
