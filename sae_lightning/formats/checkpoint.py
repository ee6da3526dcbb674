"""The SAE inside a Lightning checkpoint, without building the LightningModule or its data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from sae_lightning.formats.common import FormatError
from sae_lightning.spec import SAESpec


def load_checkpoint_sae(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the SAE of an ``SAEModule`` checkpoint (``last.ckpt``, ``step*.ckpt``).

    The checkpoint is read with ``weights_only=True``, as the trainer reads it.

    Args:
        path: the ``.ckpt`` file.
        device: where to put the weights.

    Returns:
        ``(sae, provenance)``: the SAE in eval mode, and what the checkpoint records about the
        package and plugin versions (empty when it records nothing).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        FormatError: the checkpoint was not written by ``SAEModule``.
    """
    from sae_lightning.module import CHECKPOINT_KEY
    from sae_lightning.sae import SparseAutoencoder

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {file} not found")
    ckpt = torch.load(file, map_location="cpu", weights_only=True)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    missing = [k for k in SAESpec._fields if k not in hparams]
    if missing:
        raise FormatError(
            f"{file}: hyper_parameters lack {missing} (found {sorted(hparams)}); export needs a "
            "checkpoint written by sae-lightning's SAEModule"
        )
    spec = SAESpec.read(hparams)
    sae = SparseAutoencoder.from_spec(spec, field_prefix=f"{file}:hyper_parameters")
    state = {k[len("sae.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("sae.")}
    try:
        sae.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise FormatError(
            f"{file}: the SAE weights do not match its hyper_parameters: {err}"
        ) from None
    info = ckpt.get(CHECKPOINT_KEY) or {}
    provenance = {"plugins": info["plugins"]} if "plugins" in info else {}
    return sae.to(device).eval(), provenance
