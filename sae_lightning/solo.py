"""Whether this process trains its SAEs by itself although other processes run.

Under ``trainer.distribute_saes`` each process trains SAEs of its own on whole batches, so the
loss terms and statistics that sum over data-parallel ranks
(:func:`~sae_lightning.components.base.data_parallel_world_size`) must see one rank. A leaf
module: the flag is read on the hot path and set by the multi-SAE module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_ALONE: ContextVar[bool] = ContextVar("sae_lightning_alone", default=False)


@contextmanager
def training_alone() -> Iterator[None]:
    """Inside, :func:`~sae_lightning.components.base.data_parallel_world_size` is 1: the SAEs
    trained here issue no collective although other processes run."""
    token = _ALONE.set(True)
    try:
        yield
    finally:
        _ALONE.reset(token)


def trains_alone() -> bool:
    """True inside :func:`training_alone`."""
    return _ALONE.get()
