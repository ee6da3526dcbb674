"""The one front door for loading SAEs (``load_sae``), plus run outputs (``export_sae``,
``metrics.json``).

``load_sae`` reads sae-lightning's own folders and those of SAELens and sparsify; the readers
live in :mod:`sae_lightning.formats`, which never imports this module.
"""

from __future__ import annotations

import json
import os

import torch

from sae_lightning.atomic import atomic_write_text
from sae_lightning.formats.native import (
    CONFIG_FILE,
    CONFIG_KEY,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    export_sae,
)

METRICS_FILE = "metrics.json"

__all__ = [
    "CONFIG_FILE",
    "CONFIG_KEY",
    "FORMAT_VERSION",
    "METRICS_FILE",
    "WEIGHTS_FILE",
    "export_sae",
    "load_sae",
    "write_metrics",
]


def write_metrics(path: str | os.PathLike[str], metrics: dict[str, float]) -> None:
    """Write a flat ``{"val/fvu": ..., ...}`` JSON file atomically, keys sorted."""
    atomic_write_text(path, json.dumps(dict(sorted(metrics.items())), indent=2) + "\n")


def load_sae(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Load an SAE saved by sae-lightning, SAELens or sparsify, in eval mode.

    Every format comes back as a :class:`~sae_lightning.sae.SparseAutoencoder` with
    ``encode``, ``decode`` and ``forward`` computing what the original library computes.

    Args:
        path: the SAE's directory, or a file in it.
        device: where to put the weights.
        dtype: the weights' dtype; None keeps the file's (a bf16 sparsify file stays bf16, a
            float64 SAELens file float64).

    Raises:
        FileNotFoundError: no SAE in any known format is there, or a file is missing.
        SaeLightningError: the files do not describe a loadable SAE (e.g. a plugin that is not
            installed: the message names its distribution and version).
    """
    from sae_lightning.formats.detect import detect_format, directory_of

    fmt = detect_format(path)
    if fmt == "saelens":
        from sae_lightning.formats.saelens import load_saelens

        return load_saelens(path, device, dtype)
    if fmt == "sparsify":
        from sae_lightning.formats.sparsify import load_sparsify

        return load_sparsify(path, device, dtype)
    from sae_lightning.formats.native import load_native

    return load_native(directory_of(path), device, dtype)
