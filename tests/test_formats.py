"""Export to SAELens / sparsify / native and back with the same outputs; refuse the rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from sae_lightning.cli import main
from sae_lightning.components.sparsity.topk import TopK
from sae_lightning.formats import (
    FormatError,
    UnsupportedArchitectureError,
    detect_format,
    export,
)
from sae_lightning.io import load_sae
from sae_lightning.recipe import load_recipe
from sae_lightning.runner import fit
from sae_lightning.sae import SparseAutoencoder

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
SPARSITY = {
    "relu": {"name": "relu"},
    "topk": {"name": "topk", "k": 4},
    "jumprelu": {"name": "jumprelu", "init_threshold": 0.05},
    "batchtopk": {"name": "batchtopk", "k": 4},
}


def make_sae(sparsity: str, decoder: str = "linear", center: bool = True) -> SparseAutoencoder:
    """A small SAE with every parameter moved off its initial value (biases non-zero)."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(
        12,
        40,
        {"name": "linear", "center_input": center},
        {"name": decoder},
        SPARSITY[sparsity],
    )
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.2 * torch.randn_like(p))
        if sparsity == "batchtopk":
            sae.sparsity.threshold.fill_(0.1)  # as if measured in training
    return sae.eval()


def assert_same(a: nn.Module, b: nn.Module, d_in: int = 12) -> None:
    x = torch.randn(64, d_in, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (a.encode(x) != 0).any()
        torch.testing.assert_close(b.encode(x), a.encode(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b(x), a(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b.decode(a.encode(x)), a(x), rtol=1e-6, atol=1e-6)


CASES = [
    (fmt, sparsity, decoder, center)
    for fmt in ("native", "saelens", "sparsify")
    for sparsity in SPARSITY
    for decoder in ("linear", "tied")
    for center in (True, False)
    if fmt != "sparsify" or sparsity == "topk"
]


@pytest.mark.parametrize(
    ("fmt", "sparsity", "decoder", "center"),
    CASES,
    ids=[f"{f}-{s}-{d}-{'centered' if c else 'uncentered'}" for f, s, d, c in CASES],
)
def test_round_trip_keeps_encode_and_decode(tmp_path, fmt, sparsity, decoder, center):
    sae = make_sae(sparsity, decoder, center)
    export(sae, tmp_path, fmt)
    assert detect_format(tmp_path) == fmt
    loaded = load_sae(tmp_path)
    assert not loaded.training
    assert_same(sae, loaded)
    # and the loaded SAE exports again, to the native format, unchanged
    export(loaded, tmp_path / "again", "native")
    assert_same(sae, load_sae(tmp_path / "again"))


@pytest.mark.parametrize("sparsity", ["relu", "jumprelu", "batchtopk"])
def test_sparsify_refuses_non_topk(tmp_path, sparsity):
    with pytest.raises(UnsupportedArchitectureError, match=r"TopK SAEs only.*--format saelens"):
        export(make_sae(sparsity), tmp_path, "sparsify")
    assert not any(tmp_path.iterdir())


def test_batchtopk_without_a_measured_threshold_is_refused(tmp_path):
    sae = make_sae("batchtopk")
    sae.sparsity.threshold.fill_(-1.0)  # never trained
    with pytest.raises(UnsupportedArchitectureError, match="no inference threshold"):
        export(sae, tmp_path, "saelens")


def test_batchtopk_is_saved_as_jumprelu_with_one_global_threshold(tmp_path):
    export(make_sae("batchtopk"), tmp_path, "saelens")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    from safetensors.torch import load_file

    threshold = load_file(str(tmp_path / "sae_weights.safetensors"))["threshold"]
    assert threshold.shape == (40,) and torch.all(threshold == 0.1)


class ShiftedTopK(TopK):
    """A subclass that changes the activation: must not be exported as plain TopK."""

    def forward(self, pre_acts, *, step, decoder):
        return super().forward(pre_acts - 1.0, step=step, decoder=decoder)


class TanhEncoder(nn.Module):
    center_input = True

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def weight(self):
        return self.inner.weight()

    def forward(self, x):
        return torch.tanh(self.inner(x))


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_plugins_that_change_the_maths_are_refused(tmp_path, fmt):
    sae = make_sae("topk")
    sae.sparsity = ShiftedTopK(sae.sparsity.config, d_in=12, d_sae=40)
    with pytest.raises(UnsupportedArchitectureError, match=r"ShiftedTopK.*supported"):
        export(sae, tmp_path / "a", fmt)
    sae = make_sae("topk")
    sae.encoder = TanhEncoder(sae.encoder)
    with pytest.raises(UnsupportedArchitectureError, match="TanhEncoder is not affine"):
        export(sae, tmp_path / "b", fmt)


def _saelens_dir(tmp_path: Path, **cfg_changes) -> Path:
    export(make_sae("relu"), tmp_path, "saelens")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg.update(cfg_changes)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"architecture": "gated"}, "architecture 'gated' is not supported"),
        ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm'"),
        ({"d_sae": 41}, r"W_enc has shape \(12, 40\), expected \(12, 41\)"),
    ],
)
def test_saelens_files_we_cannot_reproduce_are_refused(tmp_path, changes, message):
    with pytest.raises(FormatError, match=message):
        load_sae(_saelens_dir(tmp_path, **changes))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"activation": "groupmax"}, "activation='groupmax'"),
        ({"transcode": True}, "transcoder"),
        ({"skip_connection": True}, "W_skip"),
    ],
)
def test_sparsify_files_we_cannot_reproduce_are_refused(tmp_path, changes, message):
    export(make_sae("topk"), tmp_path, "sparsify")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, **changes}))
    with pytest.raises(UnsupportedArchitectureError, match=message):
        load_sae(tmp_path)


def test_cli_format_choices_are_the_formats():
    from sae_lightning.commands.export import FORMAT_CHOICES
    from sae_lightning.formats import FORMATS

    assert FORMAT_CHOICES == FORMATS


def test_detect_format_names_what_it_expects_and_where_saes_are(tmp_path):
    export(make_sae("topk"), tmp_path / "layers.3", "sparsify")
    with pytest.raises(FileNotFoundError, match=r"holds no SAE.*subfolders hold one: layers\.3"):
        load_sae(tmp_path)
    assert detect_format(tmp_path / "layers.3" / "cfg.json") == "sparsify"


# ---- the CLI, on a trained run ---------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    overrides = {
        "output_dir": str(out),
        "data.d": "16",
        "data.n_atoms": "64",
        "data.batch_size": "128",
        "data.val_samples": "256",
        "model.d_sae": "64",
        "trainer.max_steps": "20",
        "trainer.val_check_interval": "20",
        "trainer.enable_progress_bar": "false",
        "checkpoint.every_n_steps": "20",
    }
    fit(load_recipe([RECIPE], list(overrides.items())))
    return out / "quickstart" / "version_0"


@pytest.mark.parametrize("fmt", ["saelens", "sparsify", "native"])
def test_cli_exports_a_trained_run(trained_run, tmp_path, capsys, fmt):
    out = tmp_path / fmt
    assert main(["export", str(trained_run), "--format", fmt, "--out", str(out)]) == 0
    assert f"wrote {fmt} SAE" in capsys.readouterr().out
    assert_same(load_sae(trained_run), load_sae(out), d_in=16)


def test_cli_exports_from_a_checkpoint_and_converts_between_formats(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    assert main(["export", str(ckpt), "-f", "saelens", "-o", str(tmp_path / "a")]) == 0
    assert main(["export", str(tmp_path / "a"), "-f", "sparsify", "-o", str(tmp_path / "b")]) == 0
    assert_same(load_sae(trained_run), load_sae(tmp_path / "b"), d_in=16)


def test_cli_export_refuses_a_non_empty_folder_and_unknown_sources(trained_run, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["export", str(trained_run), "-f", "native", "-o", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(trained_run), "-f", "native", "-o", str(tmp_path), "--force"]) == 0
    assert main(["export", str(tmp_path / "nope"), "-f", "native", "-o", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_load_sae_reads_peer_formats(tmp_path, fmt):
    sae = make_sae("topk")
    export(sae, tmp_path, fmt)
    assert_same(sae, load_sae(tmp_path))
