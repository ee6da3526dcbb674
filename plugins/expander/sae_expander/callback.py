"""Evaluates OMP as an alternative encoder at every validation: ``val/omp/fvu`` beside ``val/fvu``.

The paper (Table 3) reports that OMP on the frozen dictionary recovers more than the amortised
encoder; logging both on the same validation data shows that gap during training.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from pydantic import Field
from typing_extensions import override

from sae_expander.omp import encode_omp
from sae_lightning.callbacks.batch_end import BatchEndCallback
from sae_lightning.config import PluginConfig
from sae_lightning.errors import ConfigError
from sae_lightning.metrics import FractionOfVarianceUnexplained
from sae_lightning.module import as_tensor


class OMPEvaluationConfig(PluginConfig):
    k: int | None = Field(None, gt=0, description="atoms per row; default the sparsity plugin's k")
    max_samples: int | None = Field(
        None, gt=0, description="evaluate OMP on at most this many validation rows (None: all)"
    )
    signed: bool = Field(
        True, description="pick atoms by signed correlation (the paper's code) instead of |.|"
    )


class OMPEvaluation(BatchEndCallback):
    """Logs val/omp/fvu: FVU of OMP codes on the SAE's own dictionary, next to val/fvu.

    Args:
        config: validated :class:`OMPEvaluationConfig`.
    """

    Config = OMPEvaluationConfig

    def __init__(self, config: OMPEvaluationConfig) -> None:
        self.config = config
        self.fvu: FractionOfVarianceUnexplained | None = None
        self.seen = 0

    def _k(self, pl_module: pl.LightningModule) -> int:
        if self.config.k is not None:
            return self.config.k
        k = getattr(getattr(pl_module.sae.sparsity, "config", None), "k", None)
        if not isinstance(k, int):
            raise ConfigError(
                "k",
                "the expander_omp callback takes k from the sparsity plugin, which has none",
                "set k in the callback spec: {name: expander_omp, k: <atoms per row>}",
            )
        return k

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fvu = FractionOfVarianceUnexplained(pl_module.sae.d_in).to(pl_module.device)
        self.seen = 0

    @override
    def after_validation_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, dataloader_idx: int
    ) -> None:
        if trainer.sanity_checking or self.fvu is None:
            return
        x = as_tensor(batch)
        if self.config.max_samples is not None:
            x = x[: max(self.config.max_samples - self.seen, 0)]
        if x.shape[0] == 0:
            return
        sae = pl_module.sae
        with torch.no_grad():
            codes = encode_omp(sae, x, self._k(pl_module), signed=self.config.signed)
            x_hat = sae.decode(codes)
        self.fvu.update(x, x_hat)
        self.seen += x.shape[0]

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.fvu is None or self.seen == 0:
            return
        pl_module.log("val/omp/fvu", self.fvu.compute(), sync_dist=False)
        self.fvu = None
