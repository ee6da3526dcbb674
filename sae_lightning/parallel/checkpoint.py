"""Sharded checkpoints (``torch.distributed.checkpoint`` folders) that replace each other
atomically, so a kill mid-save keeps the previous checkpoint whole.

Lightning's ``ModelParallelStrategy`` writes every rank's shards straight into the checkpoint
folder. :class:`ShardedStrategy` writes them into ``<name>.partial`` first; once every rank has
finished, rank 0 swaps the folders with two renames. Loading is Lightning's: it reads the
folder with ``torch.distributed.checkpoint``, which reshards DTensors to the mesh of the run
that loads them (any tensor-parallel size, 1 included).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy
from typing_extensions import override


class ShardedStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` whose checkpoint folders are replaced atomically."""

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        path = Path(self.broadcast(filepath))
        partial = path.with_name(path.name + ".partial")
        old = path.with_name(path.name + ".old")
        if self.is_global_zero:
            for stale in (partial, old):  # left by a kill during an earlier save
                if stale.exists():
                    shutil.rmtree(stale)
        self.barrier()
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier()
        if self.is_global_zero:
            if path.is_dir():
                path.rename(old)
            elif path.exists():
                path.unlink()
            partial.rename(path)
            if old.exists():
                shutil.rmtree(old)
        self.barrier()
