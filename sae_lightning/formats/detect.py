"""Which format a directory holds, and loading any of them through one call.

The three layouts share file names, so detection looks at all of them:

| format | files |
|---|---|
| native | ``sae.safetensors`` with an embedded config and/or ``sae_config.json`` |
| SAELens | ``cfg.json`` + ``sae_weights.safetensors`` |
| sparsify | ``cfg.json`` + ``sae.safetensors`` (no ``sae_config.json``, no embedded config) |
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open

from sae_lightning.io import CONFIG_FILE as NATIVE_CONFIG
from sae_lightning.io import CONFIG_KEY
from sae_lightning.io import WEIGHTS_FILE as NATIVE_WEIGHTS

Format = Literal["native", "saelens", "sparsify"]
FORMATS: tuple[Format, ...] = ("native", "saelens", "sparsify")

_MARKERS = ("cfg.json", "sae_weights.safetensors", NATIVE_WEIGHTS, NATIVE_CONFIG)


def _embeds_config(weights: Path) -> bool:
    try:
        with safe_open(str(weights), framework="pt") as fh:
            return CONFIG_KEY in (fh.metadata() or {})
    except Exception:  # not a readable safetensors file: let the loader explain
        return False


def _directory(path: str | os.PathLike[str]) -> Path:
    base = Path(path)
    return base.parent if base.is_file() else base


def detect_format(path: str | os.PathLike[str]) -> Format:
    """The format of the SAE in ``path`` (a directory, or a file in it).

    Raises:
        FileNotFoundError: ``path`` holds no SAE in any known format; the message lists
            subfolders that do (e.g. one folder per hookpoint in a sparsify run).
    """
    base = _directory(path)
    has = {name: (base / name).is_file() for name in _MARKERS}
    if has[NATIVE_CONFIG] or (has[NATIVE_WEIGHTS] and _embeds_config(base / NATIVE_WEIGHTS)):
        return "native"
    if has["cfg.json"] and has["sae_weights.safetensors"]:
        return "saelens"
    if has["cfg.json"] and has[NATIVE_WEIGHTS]:
        return "sparsify"
    if has[NATIVE_WEIGHTS]:
        return "native"  # load_sae explains what is missing
    found = sorted(
        str(p.relative_to(base))
        for p in base.glob("*/")
        if p.is_dir() and any((p / name).is_file() for name in _MARKERS)
    )
    hint = f"; these subfolders hold one: {', '.join(found[:10])}" if found else ""
    raise FileNotFoundError(
        f"{base} holds no SAE: expected sae.safetensors + sae_config.json (sae-lightning), "
        f"cfg.json + sae_weights.safetensors (SAELens) or cfg.json + sae.safetensors "
        f"(sparsify){hint}"
    )


def load_any(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load an SAE saved by sae-lightning, SAELens or sparsify.

    Every format comes back as a :class:`~sae_lightning.sae.SparseAutoencoder` in eval mode,
    with ``encode``, ``decode`` and ``forward`` computing what the original library computes.

    Args:
        path: the SAE's directory, or a file in it.
        device: where to put the weights.

    Raises:
        FileNotFoundError: no SAE in any known format is there.
        sae_lightning.formats.FormatError: the files are inconsistent or hold an architecture
            that has no equivalent here (the message names it).
    """
    fmt = detect_format(path)
    if fmt == "saelens":
        from sae_lightning.formats.saelens import load_saelens

        return load_saelens(path, device)
    if fmt == "sparsify":
        from sae_lightning.formats.sparsify import load_sparsify

        return load_sparsify(path, device)
    from sae_lightning.io import load_sae

    return load_sae(_directory(path), device)
