"""Callbacks: they observe and act on the run through Lightning's public hooks only."""

from sae_lightning.callbacks.atom_images import AtomImages
from sae_lightning.callbacks.dashboard import TensorBoardDashboard, log_final_hparams
from sae_lightning.callbacks.grad_norm import GradNormMonitor
from sae_lightning.callbacks.nonfinite import NonFiniteGuard
from sae_lightning.callbacks.reference_metrics import ReferenceMetrics
from sae_lightning.callbacks.resampling import DeadFeatureResampler, DeadFeatureResamplerConfig
from sae_lightning.callbacks.throughput import ThroughputMonitor

__all__ = [
    "AtomImages",
    "DeadFeatureResampler",
    "DeadFeatureResamplerConfig",
    "GradNormMonitor",
    "NonFiniteGuard",
    "ReferenceMetrics",
    "TensorBoardDashboard",
    "ThroughputMonitor",
    "log_final_hparams",
]
