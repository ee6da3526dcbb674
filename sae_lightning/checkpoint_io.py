"""Lightning checkpoints written atomically, so a kill mid-save keeps the previous checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from sae_lightning.atomic import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file, fsync, rename; loads with ``weights_only=True``."""

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        atomic_write(path, lambda fh: torch.save(checkpoint, fh))

    @override
    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def check_resume_shapes(module: torch.nn.Module, path: str) -> None:
    """Refuse to resume ``module`` from a checkpoint whose tensors have other shapes.

    Lightning would stop deep inside ``load_state_dict`` with a size mismatch; this names the
    recipe fields that set the shapes instead.

    Raises:
        ConfigError: naming ``model.d_sae`` (and its relatives) and the first differing tensor.
    """
    from sae_lightning.errors import ConfigError

    if Path(path).is_dir():  # a sharded (torch.distributed.checkpoint) folder checks its own
        return
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("state_dict")
    for key, tensor in module.state_dict().items():
        old = (saved or {}).get(key)
        if old is not None and tuple(old.shape) != tuple(tensor.shape):
            raise ConfigError(
                "model.d_sae",
                f"the checkpoint {path} holds {key} of shape {tuple(old.shape)}, but this recipe "
                f"builds {tuple(tensor.shape)}",
                "resume with the model.d_sae / expansion_factor / d_in it was trained with, "
                "or drop --ckpt_path to start a new run",
            )
