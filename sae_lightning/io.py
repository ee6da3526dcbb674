"""Saving and loading: atomic file writes, SAE export (safetensors + JSON) and ``load_sae``.

Every file is written to a temporary name in its final directory, flushed to disk and renamed
over the target, so a crash at any moment leaves either the old file or the new one, never a
torn one. Weights are read only through safetensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sae_lightning.errors import ConfigError, SaeLightningError

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "sae_config.json"
METRICS_FILE = "metrics.json"
CONFIG_KEY = "sae_lightning_config"
"""safetensors metadata key holding the same JSON as ``sae_config.json``."""
FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` atomically with ``write(binary_file_handle)``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write(fh)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


def _read_umask() -> int:
    """The process umask, read once at import (setting it briefly is not thread-safe)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync directories
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_metrics(path: str | os.PathLike[str], metrics: dict[str, float]) -> None:
    """Write a flat ``{"val/fvu": ..., ...}`` JSON file atomically, keys sorted."""
    atomic_write_text(path, json.dumps(dict(sorted(metrics.items())), indent=2) + "\n")


def export_sae(sae: torch.nn.Module, directory: str | os.PathLike[str], **extra: Any) -> Path:
    """Write ``sae.safetensors`` and ``sae_config.json`` into ``directory``.

    The config names the plugins and their parameters, so :func:`load_sae` rebuilds the SAE
    through the registry; ``extra`` entries (e.g. plugin versions) are stored alongside.
    """
    from sae_lightning import __version__

    out = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
    config = {"format_version": FORMAT_VERSION, "sae_lightning_version": __version__}
    config.update(sae.config_dict())
    config.update(extra)
    text = json.dumps(config, indent=2) + "\n"
    # The weights file carries its own config, so it is self-consistent even if a crash falls
    # between the two writes; sae_config.json is the human-readable copy.
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", CONFIG_KEY: text})
    atomic_write_text(out / CONFIG_FILE, text)
    return out


def load_sae(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load an exported SAE as a plain ``nn.Module`` with ``encode``, ``decode`` and ``forward``.

    Args:
        path: a directory holding ``sae.safetensors`` and ``sae_config.json``, or either file.
        device: where to put the weights.

    Raises:
        FileNotFoundError: when either file is missing.
        SaeLightningError: when the files do not describe a loadable SAE.
    """
    from sae_lightning.sae import SparseAutoencoder

    base = Path(path)
    if base.is_file():
        base = base.parent
    if not (base / CONFIG_FILE).is_file() and (base / "cfg.json").is_file():
        from sae_lightning.formats import load_any  # a SAELens or sparsify folder

        return load_any(base, device)
    cfg_path, weights_path = base / CONFIG_FILE, base / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"{weights_path} not found; load_sae expects a directory written by export_sae"
        )
    with safe_open(str(weights_path), framework="pt") as fh:
        embedded = (fh.metadata() or {}).get(CONFIG_KEY)
    if embedded is not None:
        config = json.loads(embedded)
    elif cfg_path.is_file():
        config = json.loads(cfg_path.read_text())
    else:
        raise FileNotFoundError(f"{cfg_path} not found and {weights_path} embeds no config")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise SaeLightningError(
            f"{cfg_path}: format_version {version!r} is not supported (this sae-lightning reads "
            f"version {FORMAT_VERSION}); re-export it with a matching sae-lightning"
        )
    try:
        sae = SparseAutoencoder(
            int(config["d_in"]),
            int(config["d_sae"]),
            config["encoder"],
            config["decoder"],
            config["sparsity"],
            field_prefix=str(cfg_path),
        )
    except KeyError as err:
        raise ConfigError(str(cfg_path), f"missing key {err}") from None
    state = load_file(str(weights_path))
    expected = sae.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise SaeLightningError(
            f"{weights_path} does not match {cfg_path}: missing {missing}, "
            f"unexpected {unexpected}, wrong shapes {wrong}"
        )
    sae.load_state_dict(state)
    return sae.to(device).eval()
