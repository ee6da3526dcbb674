"""TensorBoard dashboard: a small quickstart run's event files hold the layout, hparams,
histogram, image, throughput and gradient-norm summaries."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from sae_lightning.callbacks.atom_images import TAG as ATOMS_TAG
from sae_lightning.callbacks.atom_images import cosine_image, upscale
from sae_lightning.callbacks.dashboard import dashboard_layout
from sae_lightning.callbacks.grad_norm import global_grad_norm
from sae_lightning.callbacks.throughput import ThroughputMonitor, batch_sizes
from sae_lightning.recipe import load_recipe
from sae_lightning.runner import build_run, finish, preflight

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
STEPS, LOG_EVERY = 24, 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 24-step quickstart run with TensorBoard logging, finished like `fit` finishes it."""
    out = tmp_path_factory.mktemp("runs")
    overrides = {
        "output_dir": str(out),
        "data.d": "16",
        "data.n_atoms": "48",
        "data.batch_size": "128",
        "data.val_samples": "256",
        "model.d_sae": "64",
        "trainer.max_steps": str(STEPS),
        "trainer.val_check_interval": "12",
        "trainer.log_every_n_steps": str(LOG_EVERY),
        "trainer.enable_progress_bar": "false",
        "checkpoint.every_n_steps": "12",
    }
    built = build_run(load_recipe([RECIPE], list(overrides.items())))
    preflight(built)
    built.trainer.fit(built.module, datamodule=built.datamodule)
    progress_bar = dict(built.trainer.progress_bar_metrics)
    metrics = finish(built)
    events = EventAccumulator(
        str(built.run_dir), size_guidance={"tensors": 0, "images": 0, "scalars": 0}
    ).Reload()
    return built, events, metrics, progress_bar


def test_custom_scalars_layout_groups_the_logged_tags(run):
    _, events, _, _ = run
    (event,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())
    categories = {c.title: c for c in layout.category}
    assert list(categories) == ["loss", "sparsity", "fidelity", "throughput", "system"]
    scalars = events.Tags()["scalars"]
    for category in layout.category:
        for chart in category.chart:
            matched = [t for t in scalars if any(re.match(r, t) for r in chart.multiline.tag)]
            if "language models" in chart.title:
                assert matched == [], chart.title  # LM metrics: no LM data module yet
            else:
                assert matched, f"chart '{chart.title}' matches none of {sorted(scalars)}"
    loss_terms = next(c for c in categories["loss"].chart if c.title == "loss terms")
    assert any(
        re.match(loss_terms.multiline.tag[0], t) for t in ("train/loss/auxk", "x/train/loss/l1")
    )
    assert not re.match(loss_terms.multiline.tag[0], "train/loss")


def test_hparams_entry_holds_the_recipe_and_the_final_metrics(run):
    built, events, metrics, _ = run
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["model/sparsity/name"].string_value == "topk"
    assert hparams["model/sparsity/k"].number_value == 4
    assert hparams["data/d"].number_value == 16
    assert hparams["trainer/max_steps"].number_value == STEPS
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    names = {m.name.tag for m in experiment.experiment.metric_infos}
    assert {"final/val/fvu", "final/val/mmcs", "final/train/loss"} <= names
    (final_fvu,) = events.Scalars("final/val/fvu")
    assert final_fvu.step == STEPS
    assert final_fvu.value == pytest.approx(metrics["val/fvu"])
    saved = json.loads((built.run_dir / "metrics.json").read_text())
    assert saved["val/fvu"] == pytest.approx(metrics["val/fvu"])


def test_histogram_and_atom_image_are_logged(run):
    _, events, _, _ = run
    assert "val/feature_density_log10" in events.Tags()["histograms"]
    images = events.Images(ATOMS_TAG)
    assert [e.step for e in images] == [12, 24]  # two validations in training; the end reuses 24
    png = Image.open(io.BytesIO(images[-1].encoded_image_string))
    # (learned, true) atoms = (64, 48) pixels, repeated 6x so the smaller side reaches 256 px
    assert png.size == (64 * 6, 48 * 6)
    pixels = np.asarray(png)
    assert pixels.max() > 200 and pixels.min() < 60  # strong matches and near-orthogonal pairs


def test_throughput_and_grad_norm_are_logged(run):
    _, events, _, progress_bar = run
    tokens = events.Scalars("throughput/tokens_per_s")
    samples = events.Scalars("throughput/samples_per_s")
    assert tokens and all(e.value > 0 for e in tokens)
    assert [e.value for e in tokens] == [e.value for e in samples]  # 2-D batches: rows = samples
    grad = events.Scalars("train/grad_norm")
    assert [e.step for e in grad] == list(range(LOG_EVERY - 1, STEPS, LOG_EVERY))
    assert all(e.value > 0 for e in grad)
    assert progress_bar["throughput/tokens_per_s"] > 0


def test_cosine_image_shows_a_recovered_dictionary_as_a_staircase():
    torch.manual_seed(0)
    true = torch.linalg.qr(torch.randn(32, 32))[0][:8]  # 8 orthonormal atoms in 32 dims
    learned = torch.cat([true[torch.randperm(8)] * 3.0, torch.randn(4, 32)])  # + 4 unmatched
    image = cosine_image(true, learned)
    assert image.shape == (8, 12) and image.dtype == np.uint8
    assert (np.diag(image[:, :8]) == 255).all()  # sorted: learned atom i matches true atom i
    assert (image[:, :8][~np.eye(8, dtype=bool)] < 5).all()
    assert upscale(image).shape == (256, 384)


def test_global_grad_norm_and_batch_sizes():
    layer = torch.nn.Linear(3, 2)
    assert global_grad_norm(layer) is None
    layer(torch.ones(4, 3)).pow(2).sum().backward()
    expected = torch.cat([layer.weight.grad.flatten(), layer.bias.grad]).norm()
    assert global_grad_norm(layer) == pytest.approx(float(expected))
    assert batch_sizes(torch.zeros(8, 5)) == (8, 8)
    assert batch_sizes((torch.zeros(2, 7, 5),)) == (14, 2)
    with pytest.raises(ValueError, match="window must be >= 1"):
        ThroughputMonitor(window=0)


def test_layout_regexes_are_valid_and_anchored():
    for charts in dashboard_layout().values():
        for kind, tags in charts.values():
            assert kind == "Multiline"
            for tag in tags:
                re.compile(tag)
                assert tag.startswith("^") and tag.endswith("$")
