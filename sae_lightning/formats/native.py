"""sae-lightning's own format: ``sae.safetensors`` (with the config embedded) + ``sae_config.json``.

The config names the plugins and their parameters, so loading rebuilds the SAE through the
registry; it also records each plugin's distribution and version, so a missing plugin is named
with the package to install.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sae_lightning._version import __version__
from sae_lightning.errors import ConfigError, SaeLightningError
from sae_lightning.formats.files import SAEFiles, weights_dtype, write_sae_files
from sae_lightning.spec import SAESpec

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "sae_config.json"
FILES = SAEFiles(CONFIG_FILE, WEIGHTS_FILE, "a directory written by export_sae")
CONFIG_KEY = "sae_lightning_config"
"""safetensors metadata key holding the same JSON as ``sae_config.json``."""
FORMAT_VERSION = 1
_ROLES = (("encoder", "encoders"), ("decoder", "decoders"), ("sparsity", "sparsity"))


def export_sae(sae: torch.nn.Module, directory: str | os.PathLike[str], **extra: Any) -> Path:
    """Write ``sae.safetensors`` and ``sae_config.json`` into ``directory``.

    The config names the plugins and their parameters, so :func:`sae_lightning.load_sae`
    rebuilds the SAE through the registry; ``extra`` entries (e.g. plugin versions, the input
    scale) are stored alongside. Tensors keep their dtype.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
    config = {"format_version": FORMAT_VERSION, "sae_lightning_version": __version__}
    config.update(sae.config_dict())
    config.update(extra)
    # The weights file carries its own config; sae_config.json is the human-readable copy.
    return write_sae_files(directory, FILES, config, tensors, embed_key=CONFIG_KEY)


def embeds_config(weights: Path) -> bool:
    """Whether ``weights`` is a safetensors file carrying a native config."""
    try:
        with safe_open(str(weights), framework="pt") as fh:
            return CONFIG_KEY in (fh.metadata() or {})
    except Exception:  # not a readable safetensors file: let the loader explain
        return False


def read_native_config(base: Path) -> tuple[Path, dict[str, Any]]:
    """``(weights path, config)`` of a native SAE folder; the embedded config wins."""
    cfg_path, weights_path = base / CONFIG_FILE, base / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"{weights_path} not found; load_sae expects a directory written by export_sae"
        )
    with safe_open(str(weights_path), framework="pt") as fh:
        embedded = (fh.metadata() or {}).get(CONFIG_KEY)
    if embedded is not None:
        return weights_path, json.loads(embedded)
    if cfg_path.is_file():
        return weights_path, json.loads(cfg_path.read_text())
    raise FileNotFoundError(f"{cfg_path} not found and {weights_path} embeds no config")


def missing_plugin_message(config: dict[str, Any], where: str) -> str | None:
    """Name the distribution (and version) that provided a plugin this install lacks, or None."""
    from sae_lightning.registry import registry

    recorded = config.get("plugins") or {}
    for role, group in _ROLES:
        spec = config.get(role) or {}
        name = spec.get("name") if isinstance(spec, dict) else spec
        if not isinstance(name, str) or name in registry.names(group):
            continue
        info = recorded.get(role) or {}
        dist, version = info.get("distribution"), info.get("version")
        if dist is None:
            return f"{where}: the {role} plugin '{name}' is not installed"
        return (
            f"{where}: the {role} plugin '{name}' comes from the distribution '{dist}' "
            f"{version}, which is not installed (pip install '{dist}=={version}')"
        )
    return None


def load_native(
    base: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """Load a folder written by :func:`export_sae`, in the file's dtype or ``dtype``."""
    from sae_lightning.sae import SparseAutoencoder

    weights_path, config = read_native_config(base)
    where = str(base / CONFIG_FILE)
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise SaeLightningError(
            f"{where}: format_version {version!r} is not supported (this sae-lightning reads "
            f"version {FORMAT_VERSION}); re-export it with a matching sae-lightning"
        )
    missing = missing_plugin_message(config, where)
    if missing is not None:
        raise SaeLightningError(missing)
    try:
        sae = SparseAutoencoder.from_spec(SAESpec.read(config), field_prefix=where)
    except KeyError as err:
        raise ConfigError(where, f"missing key {err}") from None
    if isinstance(config.get("input_scale"), list):  # per channel, applied by the SAE
        sae.set_input_scale(torch.tensor(config["input_scale"]))
    state = load_file(str(weights_path))
    expected = sae.state_dict()
    missing_keys = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing_keys or unexpected or wrong:
        raise SaeLightningError(
            f"{weights_path} does not match {where}: missing {missing_keys}, "
            f"unexpected {unexpected}, wrong shapes {wrong}"
        )
    sae.to(weights_dtype(weights_path))
    sae.load_state_dict(state)
    return sae.to(device=device, dtype=dtype).eval()
