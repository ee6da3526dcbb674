"""Sharded checkpoints (``torch.distributed.checkpoint`` folders) that replace each other
atomically, so a kill mid-save keeps the previous checkpoint whole.

Lightning's ``ModelParallelStrategy`` writes every rank's shards straight into the checkpoint
folder. :class:`ShardedStrategy` writes them into ``<name>.partial`` first; once every rank has
finished, rank 0 swaps the folders with two renames. Loading is Lightning's: it reads the
folder with ``torch.distributed.checkpoint``, which reshards DTensors to the mesh of the run
that loads them (any tensor-parallel size, 1 included).
"""

from __future__ import annotations

import io
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


class SpreadStrategy(ShardedStrategy):
    """The strategy of ``trainer.distribute_saes``: a ``1 x W`` mesh on which every process
    trains SAEs of its own, with plain (not DTensor) parameters that differ between processes.

    Saving is :class:`ShardedStrategy`'s: a ``torch.distributed.checkpoint`` folder in which
    each process writes the weights of its own SAEs (keyed by name), and its optimizer and lr
    schedule (one group per SAE it holds) as one entry under its rank: DCP would key their
    param groups by position, which differs between processes. Lightning loads such folders
    only into DTensor modules, so loading is done here. Resume on as many processes.
    """

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        return optimizer.state_dict()  # this process's own: saved whole under its rank

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        import torch

        own = io.BytesIO()  # one opaque entry
        torch.save(
            {
                "optimizer_states": checkpoint.pop("optimizer_states", []),
                "lr_schedulers": checkpoint.pop("lr_schedulers", []),
            },
            own,
        )
        own.seek(0)
        state = {**checkpoint["state_dict"], _own_key(self.global_rank): own}
        super().save_checkpoint({**checkpoint, "state_dict": state}, filepath, storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        import torch
        import torch.distributed.checkpoint as dcp
        from lightning.fabric.strategies.model_parallel import _METADATA_FILENAME

        path = Path(self.broadcast(checkpoint_path))
        model, module = self.model, self.lightning_module
        assert model is not None and module is not None
        key = _own_key(self.global_rank)
        state = {"state_dict": {**model.state_dict(), key: io.BytesIO()}}
        dcp.load(state, checkpoint_id=path)
        raw = state["state_dict"].pop(key).getvalue()
        model.load_state_dict(state["state_dict"], strict=module.strict_loading)
        own = torch.load(io.BytesIO(raw), weights_only=weights_only is not False)
        if self.optimizers:  # fitting (validation builds none)
            for optimizer, saved in zip(self.optimizers, own["optimizer_states"], strict=True):
                optimizer.load_state_dict(saved)
        # the rest (loops, callbacks, hyperparameters): rank 0 wrote it, every process reads it
        metadata = torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
        return {**metadata, "lr_schedulers": own["lr_schedulers"]}


def _own_key(rank: int) -> str:
    """The checkpoint entry of one process's optimizer and lr schedule."""
    return f"process{rank}.optimizer_and_schedule"
