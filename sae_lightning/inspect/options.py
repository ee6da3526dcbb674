"""What ``sae-lightning inspect`` reads and keeps: its options, with their defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Source = Literal["auto", "lm", "cache"]


@dataclass
class InspectOptions:
    """Options of one ``inspect`` run (the CLI flags of the same names)."""

    tokens: int = 100_000
    """Scored tokens to stream (samples, for function-space data)."""
    text: list[str] | None = None
    """Text files to read instead of the recipe's corpus (the LM runs over them)."""
    source: Source = "auto"
    """``cache``: the recipe's activation cache; ``lm``: run the LM; ``auto``: the cache when
    it is complete and no ``text`` is given."""
    hook: str | None = None
    """Which hook of a multi-hook run (default the first)."""
    n_top: int = 20
    """Top contexts kept per latent."""
    before: int = 12
    """Window tokens before the maximum."""
    after: int = 4
    """Window tokens after it."""
    batch_size: int = 8
    """Contexts per chunk (one LM forward pass)."""
    effects: int = 10
    """Promoted and suppressed tokens shown per latent (0: none)."""
    near: int = 8
    """Nearest atoms shown per latent (0: none)."""
    dense_threshold: float = 0.1
    """Latents firing on more than this fraction of tokens are flagged dense."""
    dtype: str = "float32"
    """Encoding dtype: ``float32`` or ``float64``."""
    device: str | None = None
    """Device of the SAE and the LM (default: cuda when available)."""
    projector: bool = True
    """Also write the atoms into TensorBoard's embedding projector."""
    out: Path | None = None
    """Browser folder (default ``<run>/inspect``)."""

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return {"float32": torch.float32, "float64": torch.float64}[self.dtype]

    def torch_device(self) -> torch.device:
        import torch

        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
