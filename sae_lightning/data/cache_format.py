"""The on-disk format of an activation cache: manifest, shard headers, checksums, memory maps.

Layout of a cache folder::

    manifest.json                 model, revision, hook, dtype, token counts, stats, documents,
                                  shards (file, split, contexts, rows, sha256)
    train_00000.safetensors       activations (rows, d), token_ids (tokens,) int32,
                                  documents (contexts, context_length) int32
    ...
    val_00000.safetensors         the held-out contexts: the same plus input_ids, input_keep

Rows are ordered context by context, position by position, one per hook. ``documents`` gives
the corpus index of the document every position comes from (-1 for BOS), and the manifest's
``val_documents`` lists the held-out documents: no training context holds a token of theirs.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sae_lightning.errors import ConfigError, SaeLightningError

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
_NUMPY = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "BF16": np.int16}
STORAGE_DTYPES = {
    "F32": torch.float32,
    "F64": torch.float64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
CACHE_COMMAND = "sae-lightning cache --config <recipe>"


class CacheCorruptError(SaeLightningError):
    """A cache shard is missing or does not match its checksum."""


def read_manifest(path: Path, field: str) -> dict[str, Any]:
    """The manifest of the complete cache at ``path``.

    Raises:
        ConfigError: naming ``field`` when there is no complete cache there.
    """
    file = path / MANIFEST
    if not file.is_file():
        raise ConfigError(
            field,
            f"no complete activation cache at {str(path)!r} (no {MANIFEST})",
            f"write it with `{CACHE_COMMAND}`",
        )
    manifest = json.loads(file.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            field,
            f"{file} has format_version {manifest.get('format_version')!r}, "
            f"this sae-lightning reads {FORMAT_VERSION}",
            f"re-create the cache with `{CACHE_COMMAND}`",
        )
    return manifest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def header(path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors JSON header of ``path`` and the byte offset of its data."""
    with open(path, "rb") as fh:
        size = struct.unpack("<Q", fh.read(8))[0]
        return json.loads(fh.read(size)), 8 + size


def whole_safetensors(path: Path) -> bool:
    """Whether ``path`` is as long as its safetensors header says (a cheap truncation check)."""
    try:
        header_, start = header(path)
    except (struct.error, ValueError):
        return False
    ends = [info["data_offsets"][1] for key, info in header_.items() if key != "__metadata__"]
    return path.stat().st_size >= start + max(ends, default=0)


def map_tensor(path: Path, name: str) -> Tensor:
    """Tensor ``name`` of a safetensors file, memory-mapped (pages load on first touch)."""
    header_, start = header(path)
    info = header_[name]
    begin, _ = info["data_offsets"]
    array = np.memmap(
        path,
        dtype=_NUMPY[info["dtype"]],
        mode="c",
        offset=start + begin,
        shape=tuple(info["shape"]),
    )
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if info["dtype"] == "BF16" else tensor


def load_tensor(path: Path, name: str) -> Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.get_tensor(name)
