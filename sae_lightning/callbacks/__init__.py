"""Callbacks: they observe and act on the run through Lightning's public hooks only."""

from sae_lightning.callbacks.nonfinite import NonFiniteGuard
from sae_lightning.callbacks.reference_metrics import ReferenceMetrics

__all__ = ["NonFiniteGuard", "ReferenceMetrics"]
