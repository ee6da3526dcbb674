"""Which format a directory holds (``sae_lightning.load_sae`` dispatches on it).

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

from sae_lightning.formats.native import CONFIG_FILE as NATIVE_CONFIG
from sae_lightning.formats.native import WEIGHTS_FILE as NATIVE_WEIGHTS
from sae_lightning.formats.native import embeds_config

Format = Literal["native", "saelens", "sparsify"]
FORMATS: tuple[Format, ...] = ("native", "saelens", "sparsify")

_MARKERS = ("cfg.json", "sae_weights.safetensors", NATIVE_WEIGHTS, NATIVE_CONFIG)


def directory_of(path: str | os.PathLike[str]) -> Path:
    """``path`` if it is a directory, else the directory holding it."""
    base = Path(path)
    return base.parent if base.is_file() else base


def detect_format(path: str | os.PathLike[str]) -> Format:
    """The format of the SAE in ``path`` (a directory, or a file in it).

    Raises:
        FileNotFoundError: ``path`` holds no SAE in any known format; the message lists
            subfolders that do (e.g. one folder per hookpoint in a sparsify run).
    """
    base = directory_of(path)
    has = {name: (base / name).is_file() for name in _MARKERS}
    if has[NATIVE_CONFIG] or (has[NATIVE_WEIGHTS] and embeds_config(base / NATIVE_WEIGHTS)):
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
