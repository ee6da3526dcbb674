"""The training precision a run gets when its recipe names none: bf16 autocast on CUDA.

On a GPU the step is bound by memory traffic and kernel count, and bf16 halves the first;
Lightning's ``bf16-mixed`` runs the forward and backward under ``torch.autocast`` while the
weights, their gradients and Adam's state stay float32 (master weights), so updates are not
rounded to bf16. On a CPU, and on GPUs without bf16, the default stays ``32-true``.
"""

from __future__ import annotations

from typing import Any

import torch

CUDA_DEFAULT = "bf16-mixed"
"""``trainer.precision`` on a CUDA device with bf16 support, unless the recipe sets one."""

DEFAULT_TEXT = (
    f"`{CUDA_DEFAULT}` on a CUDA GPU with bf16 (autocast; weights, gradients and optimizer "
    "state stay float32), `32-true` otherwise"
)
"""The default as the recipe reference states it."""


def with_default_precision(trainer_args: dict[str, Any]) -> dict[str, Any]:
    """``trainer_args`` with ``precision`` set to :data:`CUDA_DEFAULT` when the run will use a
    CUDA device that supports bf16 and the recipe chose no precision; otherwise unchanged."""
    if "precision" in trainer_args or not _trains_on_cuda(trainer_args):
        return trainer_args
    if not torch.cuda.is_bf16_supported():
        return trainer_args
    return {**trainer_args, "precision": CUDA_DEFAULT}


def _trains_on_cuda(trainer_args: dict[str, Any]) -> bool:
    """Whether Lightning's accelerator choice for ``trainer_args`` is a CUDA device."""
    accelerator = trainer_args.get("accelerator", "auto")
    if not isinstance(accelerator, str) or accelerator not in ("auto", "gpu", "cuda"):
        return False
    return torch.cuda.is_available()
