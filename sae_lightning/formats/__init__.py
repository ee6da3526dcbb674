"""Reading and writing the SAE formats of SAELens and EleutherAI sparsify.

    from sae_lightning import load_sae
    from sae_lightning.formats import export_saelens, export_sparsify
    export_saelens(sae, "out/saelens")        # cfg.json + sae_weights.safetensors
    export_sparsify(sae, "out/sparsify")      # cfg.json + sae.safetensors (TopK only)
    same = load_sae("out/saelens")            # any of the three formats

What each format can hold, and what is refused, is in docs/export.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from sae_lightning.formats.common import (
    AffineSAE,
    FormatError,
    UnsupportedArchitectureError,
    affine_parts,
)
from sae_lightning.formats.detect import FORMATS, Format, detect_format
from sae_lightning.formats.native import export_sae
from sae_lightning.formats.saelens import export_saelens, load_saelens
from sae_lightning.formats.sparsify import export_sparsify, load_sparsify

__all__ = [
    "FORMATS",
    "AffineSAE",
    "Format",
    "FormatError",
    "UnsupportedArchitectureError",
    "affine_parts",
    "detect_format",
    "export",
    "export_saelens",
    "export_sparsify",
    "load_saelens",
    "load_sparsify",
]


def export(
    sae: torch.nn.Module, directory: str | os.PathLike[str], fmt: Format, **provenance: Any
) -> Path:
    """Write ``sae`` into ``directory`` in format ``fmt`` (``native``, ``saelens``, ``sparsify``).

    Args:
        sae: a :class:`~sae_lightning.sae.SparseAutoencoder`.
        directory: the output folder.
        fmt: one of :data:`FORMATS`.
        provenance: extra JSON stored with the native and SAELens formats (e.g. plugin
            versions); sparsify's config has no place for it.

    Raises:
        ValueError: an unknown ``fmt``.
        UnsupportedArchitectureError: the SAE cannot be written in ``fmt`` exactly.
    """
    if fmt == "saelens":
        return export_saelens(sae, directory, **provenance)
    if fmt == "sparsify":
        return export_sparsify(sae, directory)
    if fmt == "native":
        return export_sae(sae, directory, **provenance)
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
