"""When a validation-time callback acts: at every n-th validation of a fit, always otherwise.

Expensive evaluations at validation end (renders at other resolutions, images) need not run at
every validation of a long fit. A ``validate`` run, like the one ``sae-lightning fit`` ends with,
always acts, so its results reach ``metrics.json``; the sanity check never does.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override


class EveryNValidations:
    """Counts the validations of a fit and says which are due: the 1st, the (n+1)-th, ...

    Keep :meth:`state_dict` in the callback's checkpoint state, so that a resumed fit stays on
    the same schedule.

    Args:
        every: n; 1 acts at every validation.
        rank_zero_only: only global rank 0 is ever due (and counts), for callbacks that write
            images or files once.

    Raises:
        ValueError: ``every`` < 1.
    """

    def __init__(self, every: int, *, rank_zero_only: bool = False) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1 validation, got {every}")
        self.every = every
        self.rank_zero_only = rank_zero_only
        self.validations = 0
        """Validations of the fit counted so far (sanity checks excluded)."""

    def due(self, trainer: pl.Trainer) -> bool:
        """Whether to act at this validation end; counts it during fit.

        Call it once per validation, at the point where the callback would act.
        """
        if trainer.sanity_checking or (self.rank_zero_only and not trainer.is_global_zero):
            return False
        if trainer.state.fn != TrainerFn.FITTING:
            return True
        self.validations += 1
        return (self.validations - 1) % self.every == 0

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))


class ScheduledCallback(pl.Callback):
    """A callback that acts on the validations its ``schedule`` says are due.

    The schedule's count is the callback's checkpoint state (``state_dict``/``load_state_dict``),
    so a resumed fit keeps the schedule. Subclasses set ``self.schedule`` in ``__init__``.
    """

    schedule: EveryNValidations

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state_dict)
