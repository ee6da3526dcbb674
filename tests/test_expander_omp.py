"""Expander OMP: the compact correlation gives dense float64 OMP's codes; the callback logs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sae_expander import encode_omp
from sae_expander.omp import omp_dense
from torch.testing import assert_close

from sae_lightning.recipe import load_recipe
from sae_lightning.runner import fit
from sae_lightning.sae import SparseAutoencoder

D_IN, D_SAE, D, K, B = 32, 128, 6, 6, 12


def reference_omp(atoms: torch.Tensor, y: torch.Tensor, k: int, signed: bool):
    """Textbook OMP for one centred input ``y`` (``(d_in,)``) on dense ``(d_sae, d_in)`` atoms."""
    support: list[int] = []
    residual = y.clone()
    coef = y.new_zeros(0)
    for _ in range(k):
        score = atoms @ residual
        score = score if signed else score.abs()
        score[support] = -torch.inf
        support.append(int(score.argmax()))
        basis = atoms[support].t()  # (d_in, t)
        coef = torch.linalg.lstsq(basis, y.unsqueeze(1)).solution.squeeze(1)
        residual = y - basis @ coef
    return torch.tensor(support), coef


def trained_like_sae(seed: int) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(
        D_IN,
        D_SAE,
        {"name": "expander", "d": D, "seed": seed},
        {"name": "expander"},
        {"name": "signed_topk", "k": K},
    ).double()
    with torch.no_grad():
        sae.decoder.b_dec.normal_(0, 0.3)
    return sae


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("signed", [True, False])
def test_compact_omp_equals_dense_reference(seed: int, signed: bool) -> None:
    sae = trained_like_sae(seed)
    x = torch.randn(B, D_IN, dtype=torch.float64)
    codes = encode_omp(sae, x, K, signed=signed)
    assert codes.indices is not None and codes.values.shape == (B, K)
    atoms = sae.atoms()
    for b in range(B):
        support, coef = reference_omp(atoms, x[b] - sae.decoder.b_dec, K, signed)
        assert torch.equal(codes.indices[b], support)
        assert_close(codes.values[b], coef, rtol=1e-9, atol=1e-11)
    # The dense fallback (any decoder's atoms()) agrees as well.
    dense = omp_dense(atoms, sae.decoder.b_dec, x, K, signed=signed)
    assert torch.equal(dense.indices, codes.indices)
    assert_close(dense.values, codes.values, rtol=1e-9, atol=1e-11)


def test_omp_recovers_an_exactly_sparse_signal_better_than_the_encoder() -> None:
    sae = trained_like_sae(0)
    gen = torch.Generator().manual_seed(0)
    support = torch.stack([torch.randperm(D_SAE, generator=gen)[:3] for _ in range(B)])
    coef = 1 + torch.rand(B, 3, generator=gen, dtype=torch.float64)
    x = sae.decode(torch.zeros(B, D_SAE, dtype=torch.float64).scatter(1, support, coef))
    codes = encode_omp(sae, x, 3)
    omp_err = (sae.decode(codes) - x).pow(2).sum(dim=1)
    enc_err = (sae(x) - x).pow(2).sum(dim=1)
    assert omp_err.sum() < 0.1 * enc_err.sum()
    assert (omp_err < 1e-12).float().mean() >= 0.75  # exact recovery for most rows


def test_omp_rejects_k_above_d_in() -> None:
    with pytest.raises(ValueError, match="k <= min"):
        encode_omp(trained_like_sae(0), torch.randn(2, D_IN, dtype=torch.float64), D_IN + 1)


def test_callback_logs_omp_fvu_next_to_val_fvu(tmp_path: Path) -> None:
    recipe = tmp_path / "expander.yaml"
    recipe.write_text(
        f"""
name: expander
output_dir: {tmp_path / "runs"}
data: {{name: synthetic, d: 32, n_atoms: 96, batch_size: 256, val_samples: 512,
        val_batch_size: 256}}
model:
  d_sae: 128
  encoder: {{name: expander, d: 8}}
  decoder: {{name: expander}}
  sparsity: {{name: signed_topk, k: 4}}
  optimizer: {{lr: 0.01, decay: constant}}
trainer: {{max_steps: 40, val_check_interval: 20, enable_progress_bar: false}}
callbacks:
  - {{name: expander_omp, max_samples: 300}}
"""
    )
    metrics = fit(load_recipe([recipe]))
    run_dir = tmp_path / "runs" / "expander" / "version_0"
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert 0 < metrics["val/omp/fvu"] < 1
    assert 0 < metrics["val/fvu"] < 1
    config = json.loads((run_dir / "sae_config.json").read_text())
    assert config["plugins"]["encoder"]["distribution"] == "sae-expander"
