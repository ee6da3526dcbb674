"""The one cadence on which the training loop reads device values: Lightning's logging steps.

Reading a device value on the host (``.item()``, ``bool(tensor)``, a copy to the CPU) makes the
host wait until the device has run everything queued before it. Between logging steps the
module, the callbacks and the progress bar read nothing, so the host keeps queueing work while
the device runs; on logging steps (every ``trainer.log_every_n_steps``) they may.
"""

from __future__ import annotations

import lightning.pytorch as pl


def logs_step(trainer: pl.Trainer, step: int) -> bool:
    """Whether training step ``step`` logs: Lightning writes its metrics to the logger, or it is
    the run's last step (whose metrics ``metrics.json`` reports).

    Args:
        trainer: the running trainer.
        step: 0-based optimizer step: ``trainer.global_step`` inside ``training_step`` and
            ``on_before_optimizer_step``, ``trainer.global_step - 1`` in ``on_train_batch_end``.
    """
    every = trainer.log_every_n_steps
    last = 0 < trainer.max_steps <= step + 1
    return last or every_n_steps(step, every)


def every_n_steps(step: int, every: int | None) -> bool:
    """Whether 0-based training step ``step`` ends a block of ``every`` steps (steps ``every - 1``,
    ``2 * every - 1``, ...); never when ``every`` is None or 0.

    Args:
        step: 0-based optimizer step, as for :func:`logs_step`.
        every: the cadence in optimizer steps.
    """
    return every is not None and every > 0 and (step + 1) % every == 0
