"""TensorBoard as a dashboard: a custom-scalars layout, and the hparams tab at the end of a run.

The layout groups the tags the module and callbacks log into five categories (loss, sparsity,
fidelity, throughput, system); it appears under TensorBoard's "Custom Scalars" tab. The
hparams entry pairs the resolved recipe with the final metrics, so runs can be compared in the
"HParams" tab.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from sae_lightning.callbacks.tensorboard import tensorboard_loggers

HPARAMS_METRIC_PREFIX = "final/"
"""Prefix of the final metrics in the hparams entry; keeps them out of the training curves."""

_ANY_PREFIX = r"(.+/)?"  # member prefixes such as "sae0/" when a module trains several SAEs


def _tags(*names: str) -> list[str]:
    return [f"^{_ANY_PREFIX}{name}$" for name in names]


def dashboard_layout() -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout: ``{category: {chart title: ["Multiline", [tag regexes]]}}``.

    Charts list regular expressions, so loss terms and dead-fraction windows added by plugins
    or recipes appear without changing the layout. The CE-recovered / KL chart shows the
    ``e2e/*`` tags of the ``e2e_kl`` callback (language-model runs), empty without it.
    """
    return {
        "loss": {
            "total loss": ["Multiline", _tags("train/loss")],
            "loss terms": ["Multiline", _tags(r"train/loss/.+")],
        },
        "sparsity": {
            "L0 (active latents per row)": ["Multiline", _tags("train/l0", "val/l0")],
            "dead fraction": [
                "Multiline",
                _tags(r"train/dead_fraction_.+", "val/dead_fraction_eval"),
            ],
        },
        "fidelity": {
            "fraction of variance unexplained": ["Multiline", _tags("train/fvu", "val/fvu")],
            "explained variance": ["Multiline", _tags("val/explained_variance")],
            "dictionary recovery (synthetic data)": [
                "Multiline",
                _tags("val/mmcs", "val/recovered_frac"),
            ],
            "CE recovered / KL (language models)": ["Multiline", _tags(r"e2e/.+")],
        },
        "throughput": {
            "tokens per second": ["Multiline", _tags("throughput/tokens_per_s")],
            "samples per second": ["Multiline", _tags("throughput/samples_per_s")],
        },
        "system": {
            "learning rate": ["Multiline", [r"^lr(-.+|/.+)?$"]],
            "gradient norm": ["Multiline", _tags("train/grad_norm")],
        },
    }


class TensorBoardDashboard(pl.Callback):
    """Write :func:`dashboard_layout` to TensorBoard once per session, from rank 0.

    Without a TensorBoard logger it does nothing.
    """

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in tensorboard_loggers(trainer):
            logger.experiment.add_custom_scalars(dashboard_layout())


def log_final_hparams(
    trainer: pl.Trainer, params: Mapping[str, Any], metrics: Mapping[str, float]
) -> None:
    """Fill TensorBoard's hparams tab: the recipe ``params`` with the final ``metrics``.

    Uses the public ``TensorBoardLogger.log_hyperparams(params, metrics, step)``. The metrics are
    logged as ``final/<key>`` scalars at the last step (the hparams tab reads them from there),
    so they do not add a point to the ``train/*`` and ``val/*`` curves.

    Args:
        trainer: the trainer that ran; nothing happens without a TensorBoard logger.
        params: nested recipe values (flattened with ``/`` by the logger).
        metrics: the final ``{"val/fvu": ..., ...}``.
    """
    final = {f"{HPARAMS_METRIC_PREFIX}{k}": float(v) for k, v in metrics.items()}
    for logger in tensorboard_loggers(trainer):
        logger.log_hyperparams(dict(params), final, step=trainer.global_step)
        logger.experiment.flush()
