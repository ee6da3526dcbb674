"""bf16 mixed precision on CPU: every built-in plugin trains, stays finite, keeps fp32 state."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from sae_lightning.data.synthetic import SyntheticConfig, SyntheticDataModule
from sae_lightning.module import SAEModule

SPARSITY = {
    "relu": {"name": "relu", "l1_coefficient": 1e-3},
    "topk": {"name": "topk", "k": 3},
    "batchtopk": {"name": "batchtopk", "k": 3},
    "jumprelu": {"name": "jumprelu", "l0_coefficient": 1e-3, "bandwidth": 0.05},
}


class RecordLoss(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach())


@pytest.mark.parametrize("decoder", ["linear", "tied"])
@pytest.mark.parametrize("plugin", list(SPARSITY))
def test_bf16_mixed_trains_and_stays_finite(plugin: str, decoder: str) -> None:
    torch.manual_seed(0)
    data = SyntheticDataModule(
        SyntheticConfig(d=16, n_atoms=64, n_active=3, batch_size=128, val_samples=256), seed=0
    )
    module = SAEModule(
        16, 32, {"name": "linear"}, {"name": decoder}, SPARSITY[plugin], optimizer={"lr": 1e-2}
    )
    record = RecordLoss()
    trainer = pl.Trainer(
        max_steps=6,
        accelerator="cpu",
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=6,
        num_sanity_val_steps=0,
        callbacks=[record],
    )
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 6
    losses = torch.stack(record.losses)
    assert torch.isfinite(losses).all() and losses.dtype == torch.float32
    assert losses[-1] < losses[0]
    # Under the autocast Lightning applies, the encoder computes in bf16 ...
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module.sae.pre_activations(torch.randn(4, 16)).dtype == torch.bfloat16
    # ... while the weights, thresholds and counters stay in full precision.
    for name, tensor in module.state_dict().items():
        assert tensor.dtype in (torch.float32, torch.int64), name
        assert torch.isfinite(tensor.float()).all(), name
    if decoder == "linear":  # unit-norm atoms: renormalised in fp32 after every step
        norms = module.sae.decoder.W_dec.detach().norm(dim=1)
        torch.testing.assert_close(norms, torch.ones(32))
    if plugin == "batchtopk":
        assert module.sae.sparsity.threshold.item() > 0
    assert 0 <= trainer.callback_metrics["val/fvu"] < 1.5
