"""Activations from a ``.npy`` file: the template for a data-module plugin.

Built on :class:`sae_lightning.data.stream.IndexedDataModule`: training batch ``t`` is a pure
function of ``(seed, t)`` (rows drawn with a generator seeded by both), so ``--ckpt_path last``
resumes on exactly the batches an uninterrupted run would have seen and every DDP rank takes
its own slice of the same global batch. The base class provides the loaders, batch validation
and the checkpointed position.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from sae_lightning.config import PluginConfig
from sae_lightning.data.stream import IndexedDataModule, seeded_generator
from sae_lightning.data.validation import BatchValidator
from sae_lightning.errors import ConfigError

_TRAIN = 1


class NpyDataConfig(PluginConfig):
    path: str = Field(..., description="a .npy file holding a (rows, d_in) float array")
    val_rows: int = Field(256, gt=0, description="the last this many rows are the validation set")
    batch_size: int = Field(256, gt=0, description="rows per global training batch")
    val_batch_size: int = Field(256, gt=0, description="validation batch size")


class NpyDataModule(IndexedDataModule):
    """Activations read from a (rows, d_in) .npy file; the last val_rows rows validate."""

    Config = NpyDataConfig
    config: NpyDataConfig

    def __init__(self, config: NpyDataConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.seed = seed
        path = Path(config.path).expanduser()
        if not path.is_file():
            raise ConfigError("path", f"file {str(path)!r} not found", "give a .npy file")
        # mmap: the header gives the shape now, the rows are read when batches need them.
        self.rows = np.load(path, mmap_mode="r")
        if self.rows.ndim != 2 or self.rows.shape[0] <= config.val_rows:
            raise ConfigError(
                "path",
                f"{path} holds an array of shape {self.rows.shape}",
                f"store a (rows, d_in) array with more than val_rows={config.val_rows} rows",
            )
        self.n_train = self.rows.shape[0] - config.val_rows
        self.validator = BatchValidator(self.d_in, "fail", source=f"npy file {path}")

    @property
    def d_in(self) -> int:
        """Width of every row; the recipe's ``model.d_in`` defaults to it."""
        return int(self.rows.shape[1])

    def setup(self, stage: str | None = None) -> None:
        self.check_batch_size()

    def rank_batch(self, t: int) -> Tensor:
        rank, world = self.rank_and_world()
        size = self.config.batch_size
        ids = torch.randint(self.n_train, (size,), generator=seeded_generator(self.seed, _TRAIN, t))
        per_rank = size // world
        mine = ids[rank * per_rank : (rank + 1) * per_rank].numpy()
        return torch.from_numpy(np.asarray(self.rows[mine], dtype=np.float32))

    def validation_data(self) -> Tensor:
        return torch.from_numpy(np.array(self.rows[self.n_train :], dtype=np.float32))
