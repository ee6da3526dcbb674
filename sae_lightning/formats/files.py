"""The two files of an SAE directory, a JSON config and a safetensors weights file: reading,
checking and writing them the same way for every format.

Each format names its files once (:class:`SAEFiles`); the peer formats (SAELens, sparsify)
differ only in how they interpret what is read, so :func:`load_affine_sae` takes that
interpretation as an argument.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from sae_lightning.atomic import atomic_path, atomic_write_text
from sae_lightning.formats.common import (
    AffineSAE,
    FormatError,
    UnsupportedArchitectureError,
    build_sae,
)


class SAEFiles(NamedTuple):
    """The file names of one format's SAE directory."""

    config: str
    """The JSON config, e.g. ``cfg.json``."""
    weights: str
    """The safetensors weights, e.g. ``sae.safetensors``."""
    hint: str
    """What such a directory is, for the message when a file is missing."""


def write_sae_files(
    directory: str | os.PathLike[str],
    files: SAEFiles,
    config: dict[str, Any],
    tensors: dict[str, Tensor],
    *,
    embed_key: str | None = None,
) -> Path:
    """Write ``tensors`` and then ``config`` (indented JSON) atomically into ``directory``.

    With ``embed_key`` the weights file also carries the config text under that metadata key,
    so it is self-consistent even if a crash falls between the two writes.
    """
    out = Path(directory)
    text = json.dumps(config, indent=2) + "\n"
    metadata = {"format": "pt"} | ({embed_key: text} if embed_key else {})
    with atomic_path(out / files.weights) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    atomic_write_text(out / files.config, text)
    return out


def check_tensors(
    where: str, tensors: dict[str, Tensor], expected: dict[str, tuple[int, ...]], kind: str
) -> None:
    """Check that ``tensors`` are exactly ``expected``, by name and shape.

    Raises:
        FormatError: naming every missing tensor and every wrong shape.
        UnsupportedArchitectureError: naming the tensors ``kind`` (e.g. "a 'topk' SAE") has no
            place for here.
    """
    missing = sorted(set(expected) - set(tensors))
    wrong = [
        f"{name} has shape {tuple(tensors[name].shape)}, expected {shape}"
        for name, shape in expected.items()
        if name in tensors and tuple(tensors[name].shape) != shape
    ]
    if missing or wrong:
        problems = ([f"missing tensors {missing}"] if missing else []) + wrong
        raise FormatError(f"{where}: " + "; ".join(problems))
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise UnsupportedArchitectureError(
            f"{where}: tensors {unexpected} have no equivalent in {kind} here"
        )


def read_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file on the CPU: float64 kept, other floats as float32."""
    with safe_open(str(path), framework="pt") as fh:
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
    return {k: v if v.dtype == torch.float64 else v.float() for k, v in tensors.items()}


def weights_dtype(path: Path) -> torch.dtype:
    """The dtype of the first floating tensor in a safetensors file (float32 when none)."""
    with safe_open(str(path), framework="pt") as fh:
        for name in fh.keys():  # noqa: SIM118
            dtype = fh.get_slice(name).get_dtype()
            found = _SAFETENSORS_DTYPES.get(dtype)
            if found is not None:
                return found
    return torch.float32


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


def read_sae_directory(
    path: str | os.PathLike[str], files: SAEFiles
) -> tuple[Path, Path, dict[str, Any], dict[str, Tensor]]:
    """``(directory, config path, config, tensors)`` of an SAE directory.

    Args:
        path: the directory, or a file in it.
        files: the two file names the format requires.

    Raises:
        FileNotFoundError: a file is missing; the message names both files.
    """
    base = Path(path)
    if base.is_file():
        base = base.parent
    cfg_path, weights_path = base / files.config, base / files.weights
    for needed in (cfg_path, weights_path):
        if not needed.is_file():
            raise FileNotFoundError(
                f"{needed} not found; {files.hint} holds both {files.config} and {files.weights}"
            )
    return base, cfg_path, json.loads(cfg_path.read_text()), read_tensors(weights_path)


def load_affine_sae(
    path: str | os.PathLike[str],
    files: SAEFiles,
    interpret: Callable[..., AffineSAE],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Read a peer format's directory and build the SAE its files describe.

    Args:
        path: the directory, or a file in it.
        files: the format's two file names.
        interpret: ``interpret(config, tensors, where=directory) -> AffineSAE``, the format's
            reading of its config and state dict.
        device: where to put the weights.
        dtype: the weights' dtype; None keeps the file's.
    """
    base, cfg_path, config, tensors = read_sae_directory(path, files)
    parts = interpret(config, tensors, where=str(base))
    dtype = dtype or weights_dtype(base / files.weights)
    return build_sae(parts, where=str(cfg_path), dtype=dtype).to(device)
