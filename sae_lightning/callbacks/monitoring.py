"""The callbacks every run gets for its dashboard, each a no-op where it has nothing to show."""

from __future__ import annotations

import lightning.pytorch as pl

from sae_lightning.callbacks.atom_images import AtomImages
from sae_lightning.callbacks.dashboard import TensorBoardDashboard
from sae_lightning.callbacks.grad_norm import GradNormMonitor
from sae_lightning.callbacks.throughput import ThroughputMonitor


def monitoring_callbacks() -> list[pl.Callback]:
    """The dashboard's callbacks, in the order the runner adds them.

    :class:`TensorBoardDashboard`, :class:`ThroughputMonitor`, :class:`GradNormMonitor` and
    :class:`AtomImages`; each does nothing where it has nothing to show (no TensorBoard logger,
    no ground-truth atoms).
    """
    return [TensorBoardDashboard(), ThroughputMonitor(), GradNormMonitor(), AtomImages()]
