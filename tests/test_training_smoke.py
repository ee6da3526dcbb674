"""Short CPU training runs: each sparsity plugin lowers its loss on synthetic superposition data."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch

from sae_lightning.data.synthetic import SyntheticConfig, SyntheticDataModule
from sae_lightning.module import SAEModule

D_IN, D_SAE, STEPS = 16, 32, 150

SPARSITY = {
    "relu": {"name": "relu", "l1_coefficient": 1e-3},
    "topk": {"name": "topk", "k": 3},
    "batchtopk": {"name": "batchtopk", "k": 3},
    "jumprelu": {
        "name": "jumprelu",
        "l0_coefficient": 1e-4,
        "bandwidth": 0.05,
        "init_threshold": 0.01,
    },
}


def datamodule() -> SyntheticDataModule:
    cfg = SyntheticConfig(d=D_IN, n_atoms=64, n_active=3, batch_size=256, val_samples=1024)
    return SyntheticDataModule(cfg, seed=0)


def trainer() -> pl.Trainer:
    return pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )


@torch.no_grad()
def batch_loss(module: SAEModule, x: torch.Tensor) -> float:
    """Reconstruction + sparsity penalties on ``x``, as in training, without touching state."""
    sae = copy.deepcopy(module.sae).train()  # BatchTopK would update its threshold
    out = sae.run(x, step=STEPS)
    return (module.reconstruction_loss(x, out.x_hat) + sum(out.penalties.values())).item()


@pytest.mark.parametrize("plugin", list(SPARSITY))
def test_training_lowers_loss(plugin: str) -> None:
    torch.manual_seed(0)
    dm = datamodule()
    module = SAEModule(
        D_IN,
        D_SAE,
        {"name": "linear"},
        {"name": "linear"},
        SPARSITY[plugin],
        optimizer={"lr": 1e-2},
    )
    x = dm.generative.sample(1024, torch.Generator().manual_seed(123))
    loss_before = batch_loss(module, x)
    mmcs_before = dm.reference_metrics(module.sae)["mmcs"]
    trainer_ = trainer()
    trainer_.fit(module, datamodule=dm)
    assert trainer_.global_step == STEPS

    loss_after = batch_loss(module, x)
    assert torch.isfinite(torch.tensor(loss_after))
    assert loss_after < 0.7 * loss_before, (loss_before, loss_after)
    # The linear decoder kept its atoms unit-norm through every step.
    norms = module.sae.decoder.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(D_SAE))
    assert module.tokens_seen.item() == STEPS * 256

    if plugin == "topk":
        mmcs_after = dm.reference_metrics(module.sae)["mmcs"]
        assert mmcs_after > mmcs_before + 0.1, (mmcs_before, mmcs_after)
        assert (module.sae.encode_codes(x).l0() <= 3).all()
    if plugin == "batchtopk":
        assert module.sae.sparsity.threshold.item() > 0  # measured during training
    if plugin == "jumprelu":  # the thresholds were trained through the STE
        assert (module.sae.sparsity.log_threshold.detach() != torch.log(torch.tensor(0.01))).any()


def test_topk_codes_stay_sparse_through_decoding() -> None:
    """TopK hands (index, value) pairs to the decoder, which gathers k atoms per row."""
    torch.manual_seed(0)
    module = SAEModule(D_IN, D_SAE, {"name": "linear"}, {"name": "linear"}, SPARSITY["topk"])
    x = torch.randn(8, D_IN)
    out = module.sae.run(x)
    assert out.codes.indices is not None and out.codes.values.shape == (8, 3)
    dense = out.codes.dense() @ module.sae.decoder.W_dec + module.sae.decoder.b_dec
    torch.testing.assert_close(out.x_hat, dense)
