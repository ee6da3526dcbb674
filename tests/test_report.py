"""`sae-lightning report`: terminal tables and a static report.html that renders in Chromium."""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from headless import CHROMIUM, chromium_command
from PIL import Image

from sae_lightning.cli import main
from sae_lightning.recipe import load_recipe
from sae_lightning.report import (
    find_runs,
    nice_ticks,
    pareto_front,
    read_run,
    rebin,
    render_report,
)
from sae_lightning.runner import fit

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
PLOTS = {"loss", "loss-terms", "fvu", "l0", "dead", "throughput", "pareto", "density"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Two 20-step quickstart runs, k=2 and k=6, in one output folder."""
    out = tmp_path_factory.mktemp("runs")
    for k in (2, 6):
        overrides = {
            "output_dir": str(out),
            "data.d": "16",
            "data.n_atoms": "48",
            "data.batch_size": "128",
            "data.val_samples": "256",
            "model.d_sae": "64",
            "model.sparsity.k": str(k),
            "trainer.max_steps": "20",
            "trainer.val_check_interval": "10",
            "trainer.log_every_n_steps": "5",
            "trainer.enable_progress_bar": "false",
            "checkpoint.every_n_steps": "10",
        }
        fit(load_recipe([RECIPE], list(overrides.items())))
    return sorted((out / "quickstart").glob("version_*"))


def test_report_command_prints_the_table_and_writes_the_page(runs, tmp_path, capsys):
    out = tmp_path / "cmp.html"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "quickstart/version_0" in text and "quickstart/version_1" in text
    assert "val/fvu" in text and f"wrote {out}" in text
    page = out.read_text()
    assert set(re.findall(r'data-plot="([^"]+)"', page)) == PLOTS
    # static: no script, no remote resource
    assert "<script" not in page and not re.search(r'(src|href)="https?:', page)


def test_one_run_reports_into_its_folder_and_a_parent_folder_finds_every_run(runs, capsys):
    assert main(["report", str(runs[0])]) == 0
    assert (runs[0] / "report.html").is_file()
    assert find_runs([runs[0].parent]) == [p.resolve() for p in runs]
    assert main(["report", str(runs[0] / "checkpoints")]) == 2
    assert "holds no run" in capsys.readouterr().err


def test_read_run_reads_metrics_curves_histogram_and_image(runs):
    data = read_run(runs[0])
    assert data.metrics["val/l0"] == pytest.approx(2.0)
    # Lightning logs val at step - 1; the last one (step 20) ran in fit, not again in finish
    assert [s for s, _ in data.scalars["val/fvu"]] == [9, 19]
    assert data.density is not None and sum(data.density.counts) == pytest.approx(64)
    assert data.atoms_png and data.atoms_png.startswith(b"\x89PNG")
    assert not any(tag.startswith("final/") for tag in data.scalars)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it)")
def test_report_renders_in_headless_chromium(runs, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render_report([read_run(p) for p in runs]))
    flags = chromium_command(tmp_path / "profile")
    dom = subprocess.run(
        [*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    # the parsed document holds every plot, each with its marks
    plots = dict(re.findall(r'<svg class="plot" data-plot="([^"]+)"(.*?)</svg>', dom, re.S))
    assert set(plots) == PLOTS, dom[:500]
    for kind in ("loss", "fvu", "l0", "throughput"):
        assert plots[kind].count("<polyline") >= 1, kind
    assert plots["pareto"].count('class="point"') == 2
    assert plots["density"].count('class="bar"') >= 3
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1200)
    colors = {tuple(c) for c in pixels.reshape(-1, 3)[::7]}
    assert len(colors) > 100  # lines, text, bars: far from a blank page
    blue = np.all(np.abs(pixels.astype(int) - (31, 119, 180)) < 12, axis=-1)
    assert blue.sum() > 500  # the first run's colour is drawn


def test_nice_ticks_pareto_front_and_rebin():
    assert nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0] or nice_ticks(
        0, 1
    ) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(3, 3) == [3]
    assert pareto_front([(4, 0.5), (2, 0.9), (8, 0.6), (16, 0.2)]) == [
        (2, 0.9),
        (4, 0.5),
        (16, 0.2),
    ]
    edges, counts = rebin([-3, -1, 0, math.inf], [1, 4, 2, 0], -3.0, 0.0, bins=3)
    assert edges == [-3.0, -2.0, -1.0, 0.0]
    assert counts == [3.0, 2.0, 2.0] and sum(counts) == 7
