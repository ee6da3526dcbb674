"""Expander storage on disk: values + int32 indices + seed, scaling with d * d_sae; dense export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sae_expander import to_dense
from safetensors.torch import load_file
from torch.testing import assert_close

from sae_lightning.io import CONFIG_FILE, WEIGHTS_FILE, export_sae, load_sae
from sae_lightning.sae import SparseAutoencoder

D_IN, D_SAE = 128, 2048


def expander_sae(d: int, seed: int = 0) -> SparseAutoencoder:
    return SparseAutoencoder(
        D_IN,
        D_SAE,
        {"name": "expander", "d": d, "seed": seed},
        {"name": "expander"},
        {"name": "signed_topk", "k": 8},
    )


def test_file_size_scales_with_d_times_d_sae(tmp_path: Path) -> None:
    sizes = {}
    for d in (4, 16):
        export_sae(expander_sae(d), tmp_path / f"d{d}")
        sizes[d] = (tmp_path / f"d{d}" / WEIGHTS_FILE).stat().st_size
        stored = load_file(str(tmp_path / f"d{d}" / WEIGHTS_FILE))
        assert set(stored) == {
            "encoder.values",
            "encoder.b_enc",
            "encoder.indices",
            "decoder.b_dec",
        }
        config = json.loads((tmp_path / f"d{d}" / CONFIG_FILE).read_text())
        assert config["encoder"] == {"name": "expander", "d": d, "seed": 0}
    # 4 bytes per value + 4 per int32 index, for 12 more entries per latent; headers are equal
    # up to a few bytes of digits.
    assert abs((sizes[16] - sizes[4]) - 12 * D_SAE * 8) < 64
    biases = (D_IN + D_SAE) * 4
    for d, size in sizes.items():
        assert size - biases - d * D_SAE * 8 < 1024  # nothing else of any size is stored
    assert sizes[4] < D_IN * D_SAE * 4 / 10  # a dense decoder alone would be > 10x larger


def test_export_round_trip(tmp_path: Path) -> None:
    sae = expander_sae(8, seed=3)
    with torch.no_grad():
        sae.encoder.values.normal_()
        sae.encoder.b_enc.normal_(0, 0.1)
        sae.decoder.b_dec.normal_()
    export_sae(sae, tmp_path)
    loaded = load_sae(tmp_path)
    x = torch.randn(32, D_IN)
    assert torch.equal(loaded.encoder.indices, sae.encoder.indices)
    assert_close(loaded(x), sae(x), rtol=0, atol=0)


@pytest.mark.parametrize("sparsity", ["signed_topk", "relu"])
def test_to_dense_matches(sparsity: str) -> None:
    spec = {"name": sparsity, "k": 8} if sparsity == "signed_topk" else {"name": sparsity}
    sae = SparseAutoencoder(
        D_IN, 256, {"name": "expander", "d": 8}, {"name": "expander"}, spec
    ).double()
    with torch.no_grad():
        sae.encoder.b_enc.normal_(0, 0.1)
        sae.decoder.b_dec.normal_()
    dense = to_dense(sae)
    assert dense.specs["encoder"]["name"] == "linear"
    assert dense.specs["decoder"]["name"] == "linear"
    assert dense.decoder.W_dec.shape == (256, D_IN)
    x = torch.randn(64, D_IN, dtype=torch.float64)
    assert_close(dense.pre_activations(x), sae.pre_activations(x), rtol=1e-12, atol=1e-12)
    assert_close(dense(x), sae(x), rtol=1e-12, atol=1e-12)
    assert_close(dense.encode(x), sae.encode(x), rtol=1e-12, atol=1e-12)


def test_to_dense_rejects_a_dense_sae() -> None:
    sae = SparseAutoencoder(D_IN, 256, {"name": "linear"}, {"name": "linear"}, {"name": "relu"})
    with pytest.raises(TypeError, match="encoder 'expander' and decoder 'expander'"):
        to_dense(sae)
