"""Resolution-transfer metrics and concept images for function-space SAEs."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sae_neural_operator.evaluation import ResolutionTransfer
from sae_neural_operator.images import (
    ACTIVATIONS_TAG,
    CONCEPTS_TAG,
    ConceptImages,
    aligned,
    heatmap,
    line_plot,
)
from sae_neural_operator.recovery import functional_mmcs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sae_lightning.functional import relative_l2
from sae_lightning.recipe import load_recipe
from sae_lightning.registry import registry
from sae_lightning.runner import build_run, finish, preflight
from sae_lightning.sae import SparseAutoencoder

DATA = {
    "name": "function_synthetic",
    "n_atoms": 4,
    "dims": 1,
    "grid": 32,
    "n_active": 2,
    "max_bandwidth": 6,
    "batch_size": 16,
    "val_samples": 24,
    "val_batch_size": 24,
}


def recipe_file(tmp_path, data, callbacks):
    recipe = {
        "name": "transfer",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "data": data,
        "model": {
            "d_sae": 6,
            "encoder": {"name": "fno", "modes": [8] * data["dims"]},
            "decoder": {"name": "fno"},
            "sparsity": {"name": "joint_topk", "k": 2, "domain_fraction": 0.25},
            "optimizer": {"lr": 0.01},
            "loss": {"reconstruction": "rel_l2"},
        },
        "trainer": {
            "max_steps": 6,
            "accelerator": "cpu",
            "val_check_interval": 3,
            "enable_progress_bar": False,
        },
        "checkpoint": {"every_n_steps": 6},
        "callbacks": callbacks,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 6-step SAE-FNO run on 1-D synthetic functions, finished like `fit` finishes it."""
    tmp = tmp_path_factory.mktemp("transfer")
    callbacks = [
        {"name": "resolution_transfer", "resolutions": [8, 32, 64], "max_samples": 16},
        {"name": "concept_images", "n_samples": 2, "max_concepts": 3, "panel_size": 32},
    ]
    built = build_run(load_recipe([recipe_file(tmp, DATA, callbacks)]))
    preflight(built)
    built.trainer.fit(built.module, datamodule=built.datamodule)
    metrics = finish(built)
    events = EventAccumulator(
        str(built.run_dir), size_guidance={"images": 0, "scalars": 0}
    ).Reload()
    return built, metrics, events


def test_metrics_json_has_the_resolution_keys_and_skips_coarse_grids(run):
    built, _, _ = run
    written = json.loads((built.run_dir / "metrics.json").read_text())
    for n in (32, 64):
        assert f"val/rel_l2@{n}" in written and f"val/mmcs@{n}" in written
        assert 0 < written[f"val/rel_l2@{n}"] < 10 and 0 <= written[f"val/mmcs@{n}"] <= 1
    # 8 points per axis are too few for 8 Fourier modes (needs 16): skipped, noted once
    assert not any(k.endswith("@8") for k in written)
    transfer = next(c for c in built.trainer.callbacks if isinstance(c, ResolutionTransfer))
    assert transfer.noted == {("rel_l2", 8), ("mmcs", 8)}


def test_logged_values_match_a_direct_evaluation(run):
    built, metrics, _ = run
    sae, dm = built.module.sae.eval(), built.datamodule
    with torch.no_grad():
        for n in (32, 64):
            u = dm.validation_set((n,))[0][:16]
            direct = relative_l2(u.double(), sae.run(u).x_hat.double()).mean()
            assert metrics[f"val/rel_l2@{n}"] == pytest.approx(float(direct), rel=1e-5)
            true, learned = dm.true_concepts((n,)), sae.decoder.concept_functions((n,))
            mmcs = functional_mmcs(true.double(), learned.double(), shift_aware=True).mmcs
            assert metrics[f"val/mmcs@{n}"] == pytest.approx(mmcs, rel=1e-6)


def test_tensorboard_has_the_scalars_and_both_images(run):
    _, _, events = run
    tags = events.Tags()
    assert {"val/rel_l2@32", "val/rel_l2@64", "val/mmcs@64"} <= set(tags["scalars"])
    # two validations during fit (steps 3 and 6); `finish` reuses the one at the last step
    assert len(events.Scalars("val/rel_l2@32")) == 2
    assert {CONCEPTS_TAG, ACTIVATIONS_TAG} <= set(tags["images"])
    concepts = events.Images(CONCEPTS_TAG)[-1]
    image = np.asarray(Image.open(io.BytesIO(concepts.encoded_image_string)))
    # 3 rows (true atoms shown) x 2 columns (true | learned) of 32-pixel panels, 2-pixel frame
    assert image.shape[:2] == (2 + 3 * 34, 2 + 2 * 34)
    activations = events.Images(ACTIVATIONS_TAG)[-1]
    # 2 samples x (input and reconstruction overlaid, <= 2 maps: joint TopK keeps k = 2)
    assert activations.height == 2 + 2 * 34 and 2 + 2 * 34 <= activations.width <= 2 + 3 * 34


def test_resolution_transfer_refuses_data_that_cannot_render(tmp_path):
    import lightning.pytorch as pl

    from sae_lightning.errors import ConfigError
    from sae_lightning.module import SAEModule

    dm = registry.build(
        "datamodules", {"name": "synthetic", "d": 4, "val_samples": 8}, field="data"
    )
    module = SAEModule(4, 8, {"name": "linear"}, {"name": "linear"}, {"name": "topk", "k": 2})
    cb = ResolutionTransfer(ResolutionTransfer.Config(resolutions=[16]))
    trainer = pl.Trainer(
        logger=False, callbacks=[cb], enable_progress_bar=False, default_root_dir=tmp_path
    )
    with pytest.raises(ConfigError, match="data: resolution_transfer needs a data module with"):
        trainer.validate(module, datamodule=dm, verbose=False)


def test_skip_note_is_one_line_per_resolution(monkeypatch):
    # Captured at the call, not through logging: earlier tests may reconfigure Lightning's
    # loggers (propagation, levels), which made a caplog-based check order-dependent.
    import sae_neural_operator.evaluation as evaluation

    said: list[str] = []
    monkeypatch.setattr(evaluation, "rank_zero_info", said.append)
    dm = registry.build("datamodules", {**DATA, "val_samples": 4}, field="data", seed=0)
    dm.setup("validate")
    sae = SparseAutoencoder(1, 3, {"name": "fno", "modes": [8]}, {"name": "fno"}, {"name": "relu"})
    cb = ResolutionTransfer(ResolutionTransfer.Config(resolutions=[8, 16], mmcs=False))
    first, second = cb.evaluate(sae, dm), cb.evaluate(sae, dm)
    assert set(first) == set(second) == {"val/rel_l2@16"}
    notes = [m for m in said if "resolution_transfer" in m]
    assert len(notes) == 1 and "\n" not in notes[0]
    assert notes[0].startswith("resolution_transfer: skipping rel_l2@8: SpectralConv: grid")


def test_concept_images_draw_2d_heatmaps_next_to_the_true_atoms():
    data = {**DATA, "dims": 2, "grid": 16, "max_bandwidth": 4, "val_samples": 4}
    dm = registry.build("datamodules", data, field="data", seed=0)
    dm.setup("validate")
    torch.manual_seed(0)
    sae = SparseAutoencoder(
        1, 5, {"name": "fno", "modes": [4, 4]}, {"name": "fno"}, {"name": "relu"}
    )
    cb = ConceptImages(ConceptImages.Config(max_concepts=3, n_samples=2, panel_size=20))
    u = dm.validation_set((16, 16))[0][:2]
    images = cb.render(sae, dm, u)
    assert images[CONCEPTS_TAG].shape == (3, 2 + 3 * 22, 2 + 2 * 22)
    assert images[CONCEPTS_TAG].dtype == torch.uint8
    assert images[ACTIVATIONS_TAG].shape[1] == 2 + 2 * 22
    # input and reconstruction share the input's colour scale
    with torch.no_grad():
        u_hat = sae.run(u).x_hat[0, 0]
    scale = float(u[0, 0].abs().max())
    torch.testing.assert_close(images[ACTIVATIONS_TAG][:, 2:22, 2:22], heatmap(u[0, 0], 20))
    torch.testing.assert_close(images[ACTIVATIONS_TAG][:, 2:22, 24:44], heatmap(u_hat, 20, scale))
    # the first panel of the first row is the first true atom's heatmap
    true = dm.true_concepts((16, 16))[0, 0]
    torch.testing.assert_close(images[CONCEPTS_TAG][:, 2:22, 2:22], heatmap(true, 20))


def test_line_plot_puts_each_value_on_its_row():
    image = line_plot(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]), 21, 10)
    assert image.shape == (3, 21, 10) and image.dtype == torch.uint8
    # range [0, 1] with 5% margins: value 1 at row round(0.05 / 1.1 * 20) = 1, value 0 at 19
    blue, orange = [31, 119, 180], [255, 127, 14]
    assert image[:, 1, :].T.tolist() == [blue] * 10
    assert image[:, 19, :].T.tolist() == [orange] * 10
    assert (image[:, 5:15, :] == 255).all()  # white in between


def test_heatmap_colours_sign_and_scale():
    image = heatmap(torch.tensor([[2.0, -2.0], [0.0, 1.0]]), 4)
    assert image.shape == (3, 4, 4)
    assert image[:, 0, 0].tolist() == [255, 0, 0]  # max positive: red
    assert image[:, 0, 3].tolist() == [0, 0, 255]  # max negative: blue
    assert image[:, 3, 0].tolist() == [255, 255, 255]  # zero: white
    assert image[:, 3, 3].tolist() == [255, 128, 128]  # half of the scale (rounded)


def test_aligned_undoes_shift_and_sign_of_a_convolutional_concept():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(1, 16, 12, generator=g, dtype=torch.float64)
    learned = -torch.roll(true, (5, -3), dims=(1, 2))
    torch.testing.assert_close(aligned(true, learned, shift_aware=True), true)
    torch.testing.assert_close(aligned(true, -2 * true, shift_aware=False), 2 * true)
    torch.testing.assert_close(aligned(true, learned, shift_aware=False).abs(), learned.abs())
