"""The decoder atoms in TensorBoard's embedding projector, labelled by their top tokens."""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import Tensor

TAG = "sae_atoms"
STEP = 0


def clean(text: str) -> str:
    """A metadata cell: no tabs or newlines (the projector's TSV would split on them)."""
    return " ".join(text.split()) or "-"


def add_atoms(log_dir: Path, atoms: Tensor, labels: list[str], density: list[float]) -> None:
    """Write ``atoms`` (``(latents, d_in)``) with ``[latent, top tokens, density]`` metadata.

    Uses ``SummaryWriter.add_embedding``; TensorBoard pointed at ``log_dir`` (or a folder
    above it) shows the atoms under the Projector tab.
    """
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(log_dir / f"{STEP:05d}" / TAG, ignore_errors=True)  # an older inspect's atoms
    metadata = [
        [str(j), clean(label), f"{d:.3g}"]
        for j, (label, d) in enumerate(zip(labels, density, strict=True))
    ]
    with SummaryWriter(str(log_dir)) as writer:
        writer.add_embedding(
            atoms.detach().float().cpu(),
            metadata=metadata,
            metadata_header=["latent", "top tokens", "density"],
            tag=TAG,
            global_step=STEP,
        )
