"""``load_sae``, the one loader: every format keeps its dtype, missing plugins are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_lightning.errors import SaeLightningError
from sae_lightning.formats import export
from sae_lightning.io import load_sae
from sae_lightning.sae import SparseAutoencoder


def make_sae(sparsity: dict) -> SparseAutoencoder:
    torch.manual_seed(1)
    sae = SparseAutoencoder(12, 40, {"name": "linear"}, {"name": "linear"}, sparsity)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return sae.eval()


def retype(folder: Path, weights: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Rewrite a peer library's weights file in ``dtype``, as that library would save it."""
    tensors = {k: v.to(dtype) for k, v in load_file(str(folder / weights)).items()}
    save_file(tensors, str(folder / weights))
    return tensors


def test_bf16_sparsify_file_loads_as_bf16_and_computes_in_bf16(tmp_path) -> None:
    export(make_sae({"name": "topk", "k": 4}), tmp_path, "sparsify")
    t = retype(tmp_path, "sae.safetensors", torch.bfloat16)
    sae = load_sae(tmp_path)
    assert sae.encoder.W_enc.dtype == torch.bfloat16
    assert torch.equal(sae.encoder.W_enc, t["encoder.weight"])  # bit-exact, not via float32
    x = torch.randn(256, 12).to(torch.bfloat16)
    # sparsify's own encoder, all in bf16: relu((x - b_dec) @ W.T + b), the k largest per row.
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].t() + t["encoder.bias"])
    expected = pre.topk(4, dim=1).values.sort(dim=1).values
    codes = sae.encode_codes(x)
    assert codes.values.dtype == torch.bfloat16
    # The same computation in bf16 by other kernels: equal within bf16 rounding (and ties in
    # bf16 may pick another latent of the same value, so compare the selected values).
    torch.testing.assert_close(codes.values.sort(dim=1).values, expected, rtol=1.6e-2, atol=1e-2)
    assert load_sae(tmp_path, dtype=torch.float32).encoder.W_enc.dtype == torch.float32


def test_float64_saelens_file_loads_as_float64(tmp_path) -> None:
    export(make_sae({"name": "relu"}), tmp_path, "saelens")
    t = retype(tmp_path, "sae_weights.safetensors", torch.float64)
    noise = 1e-12 * torch.randn_like(t["W_enc"])  # below float32's resolution
    t["W_enc"] = t["W_enc"] + noise
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    sae = load_sae(tmp_path)
    assert sae.encoder.W_enc.dtype == torch.float64
    assert torch.equal(sae.encoder.W_enc, t["W_enc"].t())


def test_native_export_keeps_its_dtype(tmp_path) -> None:
    sae = make_sae({"name": "topk", "k": 4}).to(torch.float64)
    export(sae, tmp_path, "native")
    loaded = load_sae(tmp_path)
    assert loaded.decoder.W_dec.dtype == torch.float64
    assert torch.equal(loaded.decoder.W_dec, sae.decoder.W_dec)
    assert load_sae(tmp_path, dtype=torch.bfloat16).decoder.W_dec.dtype == torch.bfloat16


def test_a_missing_plugin_is_named_with_its_distribution_and_version(tmp_path) -> None:
    export(make_sae({"name": "topk", "k": 4}), tmp_path, "native")
    config = json.loads((tmp_path / "sae_config.json").read_text())
    config["sparsity"] = {"name": "fancy_topk", "k": 4}
    config["plugins"] = {"sparsity": {"name": "fancy_topk", "distribution": "sae-fancy",
                                      "version": "2.0.1", "state_version": 1}}  # fmt: skip
    (tmp_path / "sae_config.json").write_text(json.dumps(config))
    weights = load_file(str(tmp_path / "sae.safetensors"))
    save_file(weights, str(tmp_path / "sae.safetensors"))  # without the embedded config
    with pytest.raises(SaeLightningError, match=r"'sae-fancy' 2\.0\.1.*pip install") as err:
        load_sae(tmp_path)
    assert "did you mean" not in str(err.value) and err.value.__cause__ is None


def test_formats_never_import_the_front_door() -> None:
    import ast

    root = Path(__file__).resolve().parents[1] / "sae_lightning" / "formats"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in ("sae_lightning.io", "sae_lightning"), path.name
