"""Atomic writes and SAE export/load."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sae_lightning.atomic import atomic_write
from sae_lightning.errors import SaeLightningError
from sae_lightning.io import CONFIG_KEY, export_sae, load_sae, write_metrics
from sae_lightning.sae import SparseAutoencoder


def make_sae(sparsity=None) -> SparseAutoencoder:
    torch.manual_seed(0)
    return SparseAutoencoder(
        8, 24, {"name": "linear"}, {"name": "linear"}, sparsity or {"name": "topk", "k": 3}
    )


def test_failed_write_keeps_previous_file_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "metrics.json"
    write_metrics(target, {"val/fvu": 0.5})

    def explode(fh):
        fh.write(b'{"partial": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, explode)
    assert json.loads(target.read_text()) == {"val/fvu": 0.5}
    assert os.listdir(tmp_path) == ["metrics.json"]


@pytest.mark.parametrize(
    "sparsity",
    [
        {"name": "topk", "k": 3},
        {"name": "batchtopk", "k": 3},
        {"name": "jumprelu", "init_threshold": 0.05},
        {"name": "relu", "l1_coefficient": 0.01},
    ],
)
def test_export_then_load_reproduces_the_sae(tmp_path, sparsity):
    sae = make_sae(sparsity)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sae.eval()
    export_sae(sae, tmp_path)
    loaded = load_sae(tmp_path)
    assert isinstance(loaded, torch.nn.Module) and not loaded.training
    x = torch.randn(16, 8)
    torch.testing.assert_close(loaded(x), sae(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=0, atol=0)
    assert loaded.decode(loaded.encode(x)).shape == (16, 8)


def rewrite_embedded_config(directory, **changes) -> None:
    """Re-save sae.safetensors with its embedded config changed."""
    path = str(directory / "sae.safetensors")
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(path)
    cfg = json.loads(meta[CONFIG_KEY])
    cfg.update(changes)
    meta[CONFIG_KEY] = json.dumps(cfg)
    save_file(tensors, path, metadata=meta)


def test_load_refuses_unknown_format_and_mismatched_weights(tmp_path):
    export_sae(make_sae(), tmp_path)
    rewrite_embedded_config(tmp_path, format_version=99)
    with pytest.raises(SaeLightningError, match="format_version 99 is not supported"):
        load_sae(tmp_path)
    rewrite_embedded_config(tmp_path, format_version=1, d_sae=25)
    with pytest.raises(
        SaeLightningError, match=r"wrong shapes \['encoder.W_enc \(24, 8\) != \(25, 8\)"
    ):
        load_sae(tmp_path)


def test_weights_file_is_self_consistent_even_with_a_stale_json_copy(tmp_path):
    sae = make_sae()
    export_sae(sae, tmp_path)
    (tmp_path / "sae_config.json").write_text(json.dumps({"format_version": 1, "d_in": 3}))
    x = torch.randn(4, 8)
    torch.testing.assert_close(load_sae(tmp_path)(x), sae(x))


def test_weights_without_embedded_config_fall_back_to_the_json(tmp_path):
    sae = make_sae()
    export_sae(sae, tmp_path)
    path = str(tmp_path / "sae.safetensors")
    save_file(load_file(path), path)  # no metadata, as a third-party writer would leave it
    x = torch.randn(4, 8)
    torch.testing.assert_close(load_sae(tmp_path)(x), sae(x))


def test_load_missing_files_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds no SAE: expected sae\.safetensors"):
        load_sae(tmp_path)


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path) -> None:
    import os

    from sae_lightning.atomic import atomic_write_text

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = tmp_path / "atomic.txt"
    atomic_write_text(atomic, "x")
    assert os.stat(atomic).st_mode & 0o777 == os.stat(plain).st_mode & 0o777
