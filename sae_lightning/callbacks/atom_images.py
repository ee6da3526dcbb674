"""An image of learned atoms against the true atoms, for data with a known dictionary.

Each row is a true atom, each column a learned one, each pixel their |cosine similarity|
(black 0, white 1). Learned atoms are sorted by the true atom they match best, so a recovered
dictionary shows as a bright diagonal staircase; learned atoms that match nothing well (dead or
split features) collect, dim, on the right.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from sae_lightning.callbacks.reference_metrics import ReferenceAtomsData
from sae_lightning.callbacks.tensorboard import tensorboard_loggers

TAG = "val/atoms_vs_true_cosine"


@torch.no_grad()
def cosine_image(
    true_atoms: Tensor, learned_atoms: Tensor, max_true: int = 512, max_learned: int = 1024
) -> np.ndarray:
    """``(n_atoms, n_learned)`` uint8 image of |cos| between true and learned atoms.

    Args:
        true_atoms: ``(n_atoms, d)``.
        learned_atoms: ``(d_sae, d)``.
        max_true: keep the first this many true atoms (the most frequent ones in the synthetic
            data, whose atom frequencies fall with their index).
        max_learned: keep at most this many learned atoms (the best-matching ones first).
    """
    t = true_atoms[:max_true].detach().double().cpu()
    w = learned_atoms.detach().double().cpu()
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (t @ w.t()).abs()  # (n_atoms, d_sae)
    best, match = cos.max(dim=0)  # per learned atom: its best true atom
    # Sort by matched true atom, strong matches first; weak matches (< 0.5) go last.
    weak = best < 0.5
    key = torch.where(weak, float(t.shape[0]) + 1 - best, match.double() + (1 - best) * 0.5)
    order = torch.argsort(key)[:max_learned]
    image = (cos[:, order].clamp(0, 1) * 255).round().to(torch.uint8)
    return image.numpy()


def upscale(image: np.ndarray, min_side: int = 256) -> np.ndarray:
    """Repeat pixels so the smaller side is at least ``min_side`` (TensorBoard shows pixels 1:1)."""
    factor = max(1, -(-min_side // max(1, min(image.shape[:2]))))
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


class AtomImages(pl.Callback):
    """At each validation end, log :func:`cosine_image` as ``val/atoms_vs_true_cosine``.

    Runs only with a TensorBoard logger, on rank 0, for data modules that declare
    ``reference_atoms()`` (:class:`ReferenceAtomsData`, e.g. the synthetic data); otherwise it
    does nothing.
    """

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        loggers = tensorboard_loggers(trainer)
        sae = getattr(pl_module, "sae", None)
        datamodule = trainer.datamodule
        if not (loggers and sae is not None and isinstance(datamodule, ReferenceAtomsData)):
            return
        true = datamodule.reference_atoms()
        if true is None:
            return
        image = upscale(cosine_image(true, sae.atoms()))
        for logger in loggers:
            logger.experiment.add_image(
                TAG, image[:, :, None], trainer.global_step, dataformats="HWC"
            )
