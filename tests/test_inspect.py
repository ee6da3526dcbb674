"""`sae-lightning inspect`: top contexts, statistics and the static browser on the tiny LM."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from headless import CHROMIUM, chromium_command
from lm_scripts.tiny_lm import CHARS, D_MODEL, SPECIALS, make_corpus, make_model, make_tokenizer

from sae_lightning.cli import main
from sae_lightning.inspect.collect import collect
from sae_lightning.inspect.options import InspectOptions
from sae_lightning.inspect.run import data_spec
from sae_lightning.inspect.source import LMSource
from sae_lightning.io import export_sae
from sae_lightning.recipe import load_recipe
from sae_lightning.registry import registry
from sae_lightning.sae import SparseAutoencoder

PLANTED = SPECIALS.__len__() + CHARS.index("y")  # the token id that carries the direction
LATENT = 3  # the latent that reads it
DEAD = 7  # a latent with a bias no input overcomes
D_SAE = 8
SHOTS = os.environ.get("SAE_LIGHTNING_INSPECT_SHOTS")  # a folder: save the docs' screenshots


def planted_lm(folder: Path, direction: torch.Tensor) -> Path:
    """The tiny GPT-2 whose embeddings carry ``direction`` (scaled by 5) for token "y" only.

    Every token and position embedding is projected off ``direction`` first, so at the input
    of block 0 the component along it is 5 at the positions of "y" and 0 everywhere else.
    """
    model = make_model(seed=1)
    off = torch.eye(D_MODEL) - torch.outer(direction, direction)
    with torch.no_grad():
        model.transformer.wte.weight.copy_(model.transformer.wte.weight @ off)
        model.transformer.wpe.weight.copy_(model.transformer.wpe.weight @ off)
        model.transformer.wte.weight[PLANTED] += 5 * direction
    model.save_pretrained(str(folder))
    make_tokenizer().save_pretrained(str(folder))
    return folder


def hand_built_sae(direction: torch.Tensor) -> SparseAutoencoder:
    """ReLU SAE: latent LATENT = relu(<x, direction> - 1); DEAD never fires; others random."""
    sae = SparseAutoencoder(
        D_MODEL, D_SAE, {"name": "linear"}, {"name": "linear"}, {"name": "relu"}
    )
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        sae.encoder.W_enc.copy_(torch.randn(D_SAE, D_MODEL, generator=g))
        sae.encoder.b_enc.copy_(torch.randn(D_SAE, generator=g))
        sae.encoder.W_enc[LATENT] = direction
        sae.encoder.b_enc[LATENT] = -1.0
        sae.encoder.b_enc[DEAD] = -1e6
        sae.decoder.b_dec.zero_()
    return sae


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inspect")
    direction = torch.nn.functional.normalize(torch.randn(D_MODEL), dim=0)
    model = planted_lm(root / "model", direction)
    make_corpus(root / "text", n_docs=16)
    recipe = root / "recipe.yaml"
    data = {
        "name": "lm_activations",
        "model": str(model),
        "hook": "transformer.h.0",
        "io": "input",  # the residual stream entering block 0: embeddings only
        "text": [str(root / "text")],
        "context_length": 32,
        "val_sequences": 2,
        "model_dtype": "float64",
        "dtype": "float64",
        "batch_size": 64,
        "buffer_size": 256,
    }
    spec = {"name": "tiny-inspect", "data": data, "model": {"d_sae": D_SAE, "sparsity": "relu"}}
    recipe.write_text(yaml.safe_dump(spec))
    run = root / "runs" / "tiny-inspect" / "version_0"
    export_sae(hand_built_sae(direction).double(), run)
    args = ["inspect", str(run), "--config", str(recipe), "--dtype", "float64", "--top", "6"]
    assert main([*args, "--batch_size", "3", "--before", "5", "--after", "2"]) == 0
    return {"run": run, "recipe": recipe, "browser": run / "inspect"}


def group(browser: Path, first: int = 0) -> list[dict]:
    text = (browser / "data" / f"latents_{first // 64:05d}.js").read_text()
    prefix = f"inspectGroup({first}, "
    assert text.startswith(prefix) and text.endswith(");\n")
    return json.loads(text[len(prefix) : -3])


def test_every_top_context_of_the_planted_latent_peaks_at_the_planted_token(lm_run):
    latents = group(lm_run["browser"])
    assert len(latents) == D_SAE
    page = latents[LATENT]
    assert len(page["contexts"]) == 6
    for context in page["contexts"]:
        assert context["tokens"][context["peak"]] == "y"
        assert context["max"] == pytest.approx(4.0)
        lit = [t for t, a in zip(context["tokens"], context["acts"], strict=True) if a > 0]
        assert lit and set(lit) == {"y"}  # nothing else in the window fires
    assert [c["max"] for c in page["contexts"]] == sorted(
        (c["max"] for c in page["contexts"]), reverse=True
    )
    assert latents[DEAD]["flag"] == "dead" and latents[DEAD]["contexts"] == []
    # residual-stream hook: logit effects through ln_f and the tied unembedding are shown
    assert len(page["up"]) == 10 and len(page["down"]) == 10
    assert page["up"][0][1] >= page["up"][-1][1] > page["down"][-1][1] >= page["down"][0][1]
    assert len(page["near"]) == D_SAE - 1 and LATENT not in [n[0] for n in page["near"]]


def brute_force(
    recipe: Path, sae: SparseAutoencoder, splits: tuple[str, ...] = ("train", "val")
) -> torch.Tensor:
    """Every scored token's float64 activations, computed at once: ``(tokens, latents)``."""
    f, keep = brute_force_contexts(recipe, sae, splits)
    return f[keep]


def brute_force_contexts(
    recipe: Path, sae: SparseAutoencoder, splits: tuple[str, ...] = ("train", "val")
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(contexts, L, latents)`` float64 activations (0 where unscored) and the scored mask."""
    dm = registry.build("datamodules", load_recipe([recipe]).data, field="data")
    dm.load()
    ids = torch.cat([getattr(dm.corpus, s).ids for s in splits])
    keep = torch.cat([getattr(dm.corpus, s).keep for s in splits])
    with torch.no_grad():
        x = dm.model(input_ids=ids, output_hidden_states=True).hidden_states[0].double()
        f = torch.relu(x @ sae.encoder.W_enc.double().T + sae.encoder.b_enc.double())
    return f * keep[..., None], keep


def test_density_and_histogram_equal_a_float64_brute_force(lm_run):
    from sae_lightning.io import load_sae

    sae = load_sae(lm_run["run"]).double()
    recipe = load_recipe([lm_run["recipe"]])
    options = InspectOptions(tokens=10**9, dtype="float64")
    dm = registry.build("datamodules", data_spec(recipe, options), field="data")
    dm.load()
    ids = torch.cat([dm.corpus.train.ids, dm.corpus.val.ids])
    keep = torch.cat([dm.corpus.train.keep, dm.corpus.val.keep])
    source = LMSource(dm.model, "transformer.h.0", "input", ids, keep, batch_size=5)
    collected = collect(sae, source, n_top=4, before=3, after=1, dtype=torch.float64)
    got = collected.stats

    per_context, _ = brute_force_contexts(lm_run["recipe"], sae)
    best = per_context.amax(dim=1).topk(4, dim=0).values  # (4, latents): top context maxima
    torch.testing.assert_close(collected.top.values, best, rtol=1e-12, atol=0)
    f = brute_force(lm_run["recipe"], sae)
    assert got.tokens == f.shape[0] == int(keep.sum())
    fires = (f > 0).sum(dim=0)
    assert torch.equal(got.fires, fires) and 0 < int(fires[LATENT]) < f.shape[0] // 5
    assert torch.equal(got.density, fires.double() / f.shape[0])
    torch.testing.assert_close(got.total, f.sum(dim=0), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(got.peak, f.amax(dim=0), rtol=0, atol=0)
    edges = got.edges.numpy()
    for j in range(D_SAE):
        values = f[:, j][f[:, j] > 0].numpy()
        bins = (edges[None, :] <= values[:, None]).sum(axis=1) - 1
        expected = torch.bincount(torch.from_numpy(bins).clamp(0, len(edges) - 2), minlength=64)
        assert torch.equal(got.hist[j], expected), j
    assert int(got.hist[LATENT].sum()) == int(fires[LATENT])


def chromium(tmp: Path, *args: str) -> str:
    flags = [*chromium_command(tmp / "profile"), "--virtual-time-budget=5000"]
    return subprocess.run([*flags, *args], capture_output=True, text=True, timeout=120).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it)")
def test_the_browser_renders_sorts_and_links_to_a_highlighted_latent(lm_run, tmp_path):
    index = (lm_run["browser"] / "index.html").as_uri()
    for key in ("density", "max"):
        dom = chromium(tmp_path, "--dump-dom", f"{index}?sort={key}")
        rows = re.findall(rf'<tr class="latent" data-id="(\d+)".*?data-{key}="([^"]+)"', dom)
        assert len(rows) == D_SAE, dom[:800]
        values = [float(v) for _, v in rows]
        assert values == sorted(values, reverse=True), key
    assert rows[-1][0] == str(DEAD) and 'class="flag-dead"' in dom
    # click through: follow the index's own link of the planted latent
    href = re.search(rf'<tr class="latent" data-id="{LATENT}".*?<a href="([^"]+)"', dom).group(1)
    target = f"{index.rsplit('/', 1)[0]}/{href}"
    page = chromium(tmp_path, "--dump-dom", target)
    contexts = re.findall(r'<div class="ctx" data-max="[\d.e+-]+">.*?</div>', page, re.S)
    assert len(contexts) == 6, page[:800]
    for ctx in contexts:
        spans = re.findall(r'<span class="tok( peak)?" data-act="([^"]+)".*?>(.*?)</span>', ctx)
        assert [text for peak, _, text in spans if peak] == ["y"]
        assert {text for _, act, text in spans if float(act) > 0} == {"y"}
    assert page.count('class="bar"') >= 1 and "promoted tokens" in page
    if SHOTS:
        for name, url in (
            ("inspect-index.png", f"{index}?sort=density"),
            ("inspect-latent.png", target),
        ):
            shot = Path(SHOTS) / name
            chromium(tmp_path, f"--screenshot={shot}", "--window-size=900,1000", url)
            assert shot.is_file()


def test_the_cache_path_reads_the_same_tokens_and_finds_the_same_peaks(lm_run, tmp_path):
    from rich.console import Console

    from sae_lightning.data.cache import write_cache

    cache = tmp_path / "cache"
    recipe = load_recipe([lm_run["recipe"]], [("data.cache_dir", str(cache))])
    write_cache(registry.build("datamodules", recipe.data, field="data"), Console(quiet=True))
    out = tmp_path / "browser"
    args = ["inspect", str(lm_run["run"]), "--config", str(lm_run["recipe"]), "--source", "cache"]
    args += ["--data.cache_dir", str(cache), "--out", str(out), "--no_projector", "--top", "6"]
    assert main([*args, "--dtype", "float64", "--batch_size", "2"]) == 0
    pages = group(out)
    for context in pages[LATENT]["contexts"]:
        assert context["tokens"][context["peak"]] == "y"
    # the cache holds the training contexts: the brute force over them gives the same density
    f = brute_force(lm_run["recipe"], load_sae_double(lm_run["run"]), splits=("train",))
    density = (f > 0).double().mean(dim=0)
    got = [p["density"] for p in pages]
    assert got == pytest.approx([float(f"{d:.4g}") for d in density.tolist()], rel=0, abs=0)


def load_sae_double(run: Path) -> SparseAutoencoder:
    from sae_lightning.io import load_sae

    return load_sae(run).double()


def test_projector_metadata_and_the_report_link(lm_run, tmp_path, capsys):
    projector = (lm_run["run"] / "projector_config.pbtxt").read_text()
    assert "sae_atoms" in projector
    tsv = next(lm_run["run"].rglob("metadata.tsv")).read_text().splitlines()
    assert tsv[0].split("\t") == ["latent", "top tokens", "density"]
    assert len(tsv) == D_SAE + 1 and tsv[1 + LATENT].split("\t")[1] == "y"
    tensors = next(lm_run["run"].rglob("tensors.tsv")).read_text().splitlines()
    assert len(tensors) == D_SAE and len(tensors[0].split("\t")) == D_MODEL
    out = tmp_path / "report.html"
    assert main(["report", str(lm_run["run"]), "--out", str(out)]) == 0
    link = re.search(r'<a class="inspect" href="([^"]+)"', out.read_text()).group(1)
    assert (tmp_path / link).resolve() == (lm_run["browser"] / "index.html").resolve()


def test_inspect_names_the_missing_recipe_and_run(lm_run, tmp_path, capsys):
    assert main(["inspect", str(lm_run["run"])]) == 2
    assert "--config" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path), "--config", str(lm_run["recipe"])]) == 2
    assert "RUN_DIR" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it)")
def test_65536_latents_are_paginated_into_small_files_and_open(tmp_path):
    from sae_lightning.inspect.site import GROUP, write_browser

    n = 65_536
    rows = [[j, (j % 1000) / 1000, float(j % 777), 0.5, "", f"t{j}"] for j in range(n)]

    def page(j: int) -> dict:
        tokens = ["a", "b", f"t{j}", "c"]
        context = {"max": 1.0, "peak": 2, "tokens": tokens, "acts": [0, 0.5, 1.0, 0]}
        return {
            "id": j,
            "flag": "",
            "density": 0.1,
            "max": 1.0,
            "mean": 0.1,
            "mean_active": 1.0,
            "hist": [[1, 2, 3]],
            "contexts": [context] * 5,
        }

    index = write_browser(tmp_path / "inspect", "big", "synthetic", rows, page)
    groups = sorted((tmp_path / "inspect" / "data").glob("latents_*.js"))
    assert len(groups) == n // GROUP
    assert max(g.stat().st_size for g in groups) < 256 * 1024  # one latent reads one small file
    dom = chromium(tmp_path, "--dump-dom", f"{index.as_uri()}?sort=max&page=2")
    ids = [int(i) for i in re.findall(r'<tr class="latent" data-id="(\d+)"', dom)]
    assert len(ids) == 100 and "page 2 of 656" in dom
    expected = sorted(range(n), key=lambda j: (-rows[j][2], j))[100:200]
    assert ids == expected
    dom = chromium(tmp_path, "--dump-dom", f"{index.parent.as_uri()}/latent.html?id=65535")
    assert "<h1>latent 65535</h1>" in dom and dom.count('class="tok peak"') == 5
