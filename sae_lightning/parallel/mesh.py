"""The 2-D device mesh ``(data_parallel, tensor_parallel)`` and the process groups it gives.

Lightning's ``ModelParallelStrategy`` builds the mesh; this module reads what the sharded SAE
needs from it: both groups, this rank's coordinates and the slice of latents it owns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from sae_lightning.errors import ConfigError

DP, TP = "data_parallel", "tensor_parallel"
"""Mesh dimension names, as Lightning's ``ModelParallelStrategy`` names them."""


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank sits in the mesh and which latents it owns."""

    mesh: DeviceMesh
    dp_group: dist.ProcessGroup
    tp_group: dist.ProcessGroup
    dp_size: int
    tp_size: int
    dp_rank: int
    tp_rank: int
    d_sae: int

    @property
    def shard_size(self) -> int:
        """Latents per rank."""
        return self.d_sae // self.tp_size

    @property
    def offset(self) -> int:
        """Global id of this rank's first latent."""
        return self.tp_rank * self.shard_size

    @property
    def tp_ranks(self) -> list[int]:
        """Global ranks of this rank's tensor-parallel group, in shard order."""
        return dist.get_process_group_ranks(self.tp_group)


def shard_layout(mesh: DeviceMesh, d_sae: int) -> ShardLayout:
    """The layout of ``d_sae`` latents over ``mesh``'s tensor-parallel dimension.

    Raises:
        ConfigError: ``d_sae`` does not divide by the tensor-parallel size.
    """
    dp, tp = mesh[DP], mesh[TP]
    if d_sae % tp.size():
        raise ConfigError(
            "model.d_sae",
            f"{d_sae} latents do not split evenly over trainer.tensor_parallel_size={tp.size()}",
            "choose d_sae (or expansion_factor x d_in) divisible by tensor_parallel_size",
        )
    return ShardLayout(
        mesh=mesh,
        dp_group=dp.get_group(),
        tp_group=tp.get_group(),
        dp_size=dp.size(),
        tp_size=tp.size(),
        dp_rank=dp.get_local_rank(),
        tp_rank=tp.get_local_rank(),
        d_sae=d_sae,
    )
