"""What the two language-model data modules share, on top of :class:`IndexedDataModule`.

Both deliver activations of one LM (harvested on the fly or read from a cache), scaled and
clipped by one :class:`ActivationTransform` estimated at setup, and both hand the KL callback
the LM with held-out contexts (:class:`LMHandle`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from sae_lightning.data.lm_config import ActivationOptions
from sae_lightning.data.normalization import ActivationTransform, NormStats, scale_factor
from sae_lightning.data.stream import IndexedDataModule
from sae_lightning.data.validation import BatchValidator
from sae_lightning.lm.hooks import HookIO
from sae_lightning.lm.text import Contexts


@dataclass
class LMHandle:
    """What the KL callback needs: the LM, where the SAE goes, and held-out tokens."""

    model: nn.Module
    hooks: list[str]
    io: HookIO
    scale: float
    heldout_ids: Tensor
    """``(n, context_length)`` token ids of documents never trained on."""
    heldout_keep: Tensor
    """``(n, context_length)`` bool: positions the SAE is trained for (others stay clean)."""
    eval_sets: dict[str, Contexts] = field(default_factory=dict)
    """Named evaluation corpora (``eval_text``), packed into contexts."""
    activations: Callable[[Contexts], Tensor] | None = None
    """Kept activations of contexts at the hooks, transformed as training data (for FVU)."""


class ActivationData(IndexedDataModule):
    """Shared by both plugins: the transform, validation at the door, position state."""

    config: ActivationOptions

    def __init__(self, config: ActivationOptions, seed: int) -> None:
        super().__init__()
        self.config = config
        self.seed = config.seed if config.seed is not None else seed
        self.stats: NormStats | None = None
        self.transform: ActivationTransform | None = None
        self._val: Tensor | None = None
        self._resumed_state: dict[str, Any] | None = None

    @property
    def d_in(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def scale(self) -> float:
        """The factor activations are multiplied by (1.0 until setup, or without normalize)."""
        return self.transform.scale if self.transform is not None else 1.0

    def _set_stats(self, stats: NormStats) -> None:
        c = self.config
        self.stats = stats
        max_norm = None if c.outlier_factor is None else c.outlier_factor * stats.median_norm
        self.transform = ActivationTransform(
            scale_factor(stats, c.normalize, self.d_in), max_norm, c.outlier_action
        )
        self.validator = BatchValidator(self.d_in, c.nonfinite, source=self._source_name())
        self._restore_validator()

    def _source_name(self) -> str:
        return type(self).__name__

    def validation_data(self) -> Tensor:
        assert self._val is not None, "call setup() first"
        return self._val

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "scale": self.scale}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consumed.load_state_dict(state_dict)
        self._resumed_state = dict(state_dict)
        self._restore_validator()

    def _restore_validator(self) -> None:
        """Apply checkpointed state (dropped-row count, scale) once setup has built the parts.

        The scale is recomputed identically from the same rows, but taking the saved value
        keeps a resumed run exact even where float rounding differs (another thread count).
        """
        state = self._resumed_state
        if state is None:
            return
        if self.validator is not None:
            self.validator.load_state_dict(state)
        if self.transform is not None and "scale" in state:
            self.transform.scale = float(state["scale"])

    def language_model(self) -> LMHandle:  # pragma: no cover - overridden
        """The LM, the hook and held-out tokens, for :class:`E2EKLEvaluation`."""
        raise NotImplementedError
