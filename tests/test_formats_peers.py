"""Files written by SAELens and sparsify themselves load here and compute what they computed.

The fixtures in ``tests/test_formats_data`` were saved by SAELens 6.54.12 and eai-sparsify 1.3.3
with the outputs those libraries produced (see the README there). Each is checked against the
stored outputs and against a float64 reference written from the peers' formulas; our own
exports are read back with the same float64 reference, i.e. with the peers' loading semantics.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_lightning.formats import detect_format, export_saelens, export_sparsify
from sae_lightning.io import load_sae
from sae_lightning.sae import SparseAutoencoder

DATA = Path(__file__).parent / "test_formats_data"
SAELENS = sorted(p.name for p in DATA.glob("saelens_*"))
SPARSIFY = sorted(p.name for p in DATA.glob("sparsify_*"))


def saelens_reference(folder: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens's encode and decode (sae_lens/saes/*.py), in float64, from the raw files."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = {k: v.double() for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    x = x.double()
    sae_in = x - w["b_dec"] * float(cfg.get("apply_b_dec_to_input", True))
    hidden = sae_in @ w["W_enc"] + w["b_enc"]  # (batch, d_sae)
    arch = cfg["architecture"]
    rescale = arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False)
    norms = w["W_dec"].norm(dim=-1)
    if arch == "standard":
        feats = torch.relu(hidden)
    elif arch == "topk":
        if rescale:
            hidden = hidden * norms
        values, idx = hidden.topk(cfg["k"], dim=-1)
        feats = torch.zeros_like(hidden).scatter(-1, idx, values.relu())
    elif arch == "jumprelu":
        feats = torch.relu(hidden) * (hidden > w["threshold"].relu())
    else:
        raise AssertionError(arch)
    recon = (feats / norms if rescale else feats) @ w["W_dec"] + w["b_dec"]
    return feats, recon


def sparsify_reference(folder: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsify's SparseCoder encode and decode (sparse_coder.py, fused_encoder.py) in float64."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = {k: v.double() for k, v in load_file(str(folder / "sae.safetensors")).items()}
    pre = torch.relu((x.double() - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    values, idx = pre.topk(cfg["k"], dim=-1)
    feats = torch.zeros_like(pre).scatter(-1, idx, values)
    return feats, feats @ w["W_dec"] + w["b_dec"]


def assert_matches(sae: torch.nn.Module, x: torch.Tensor, feats: torch.Tensor, recon: torch.Tensor):
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x).double(), feats.double(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sae(x).double(), recon.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", SAELENS + SPARSIFY)
def test_peer_saved_files_load_and_match_the_peer_outputs(name: str) -> None:
    folder = DATA / name
    expected = load_file(str(folder / "expected.safetensors"))
    x = expected["x"]
    sae = load_sae(folder)
    assert detect_format(folder) == name.split("_")[0]
    assert_matches(sae, x, expected["encode"], expected["recon"])
    reference = saelens_reference if name.startswith("saelens") else sparsify_reference
    assert_matches(sae, x, *reference(folder, x))
    # the fixture is not trivial: some latents fire, not all
    active = (expected["encode"] != 0).float().mean()
    assert 0 < active < 1


def test_fixture_config_keys_are_what_we_write(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sae = SparseAutoencoder(
        16, 48, {"name": "linear"}, {"name": "linear"}, {"name": "topk", "k": 5}
    ).eval()
    export_saelens(sae, tmp_path / "saelens")
    export_sparsify(sae, tmp_path / "sparsify")
    theirs = json.loads((DATA / "saelens_topk" / "cfg.json").read_text())
    ours = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert set(ours) - {"sae_lightning"} == set(theirs)
    assert set(ours["metadata"]) <= set(theirs["metadata"])
    theirs = json.loads((DATA / "sparsify_topk" / "cfg.json").read_text())
    ours = json.loads((tmp_path / "sparsify" / "cfg.json").read_text())
    assert set(ours) == set(theirs)
    for fmt, weights, fixture in (
        ("saelens", "sae_weights.safetensors", "saelens_topk"),
        ("sparsify", "sae.safetensors", "sparsify_topk"),
    ):
        mine = load_file(str(tmp_path / fmt / weights))
        real = load_file(str(DATA / fixture / weights))
        assert {k: (tuple(v.shape), v.dtype) for k, v in mine.items()} == {
            k: (tuple(v.shape), v.dtype) for k, v in real.items()
        }


@pytest.mark.parametrize(
    "sparsity",
    [
        {"name": "relu"},
        {"name": "topk", "k": 4},
        {"name": "jumprelu", "init_threshold": 0.05},
        {"name": "batchtopk", "k": 4},
    ],
    ids=lambda s: s["name"],
)
@pytest.mark.parametrize("center", [True, False], ids=["centered", "uncentered"])
def test_our_exports_read_with_peer_semantics(tmp_path: Path, sparsity, center: bool) -> None:
    torch.manual_seed(1)
    sae = SparseAutoencoder(
        16, 48, {"name": "linear", "center_input": center}, {"name": "linear"}, sparsity
    )
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.2 * torch.randn_like(p))
        if sparsity["name"] == "batchtopk":
            sae.sparsity.threshold.fill_(0.15)
    sae.eval()
    x = torch.randn(32, 16)
    export_saelens(sae, tmp_path / "saelens")
    assert_matches(sae, x, *saelens_reference(tmp_path / "saelens", x))
    if sparsity["name"] == "topk":
        export_sparsify(sae, tmp_path / "sparsify")
        assert_matches(sae, x, *sparsify_reference(tmp_path / "sparsify", x))
