"""`sae-lightning inspect` on a function-space run writes a page per concept with pictures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("sae_neural_operator")

from sae_lightning.cli import main
from sae_lightning.recipe import load_recipe
from sae_lightning.runner import fit

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "function-recovery-sae-fno.yaml"
SMALL = {
    "data.val_samples": "48",
    "data.batch_size": "16",
    "trainer.max_steps": "3",
    "trainer.val_check_interval": "3",
    "trainer.enable_progress_bar": "false",
    "checkpoint.every_n_steps": "3",
}


def test_inspect_on_the_sae_fno_recipe_writes_concept_pages(tmp_path):
    fit(load_recipe([RECIPE], [("output_dir", str(tmp_path)), *SMALL.items()]))
    run = tmp_path / "function-recovery-sae-fno" / "version_0"
    overrides = [x for k, v in SMALL.items() if k.startswith("data.") for x in (f"--{k}", v)]
    assert main(["inspect", str(run), "--config", str(RECIPE), "--top", "4", *overrides]) == 0
    browser = run / "inspect"
    text = (browser / "data" / "latents_00000.js").read_text()
    pages = json.loads(text[len("inspectGroup(0, ") : -3])
    assert [p["id"] for p in pages] == list(range(16))  # d_sae concepts, one page each
    live = [p for p in pages if p["flag"] != "dead"]
    assert live, "no concept fired on 48 validation samples"
    for page in live:
        assert page["density"] > 0 and page["max"] > 0
        names = page["images"]
        assert [Path(n).stem.rsplit("_", 1)[1] for n in names] == ["concept", "fields"]
        fields = np.asarray(Image.open(browser / names[1]).convert("RGB"))
        # 1-D fields in blue with the concept's activation map overlaid in orange
        blue = np.all(np.abs(fields.astype(int) - (31, 119, 180)) < 40, axis=-1).sum()
        orange = np.all(np.abs(fields.astype(int) - (255, 127, 14)) < 40, axis=-1).sum()
        assert blue > 20 and orange > 5, page["id"]
    for page in pages:
        if page["flag"] == "dead":
            assert page["images"] == ["images/" + f"concept_{page['id']:05d}_concept.png"]
