"""The documentation stays true: generated reference up to date, recipes valid, links intact."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sae_lightning.docgen import REGENERATE, recipe_reference
from sae_lightning.recipe import load_recipe
from sae_lightning.registry import Registry
from sae_lightning.runner import build_run, resolved_recipe

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def links(path: Path) -> list[str]:
    """Markdown link targets in ``path``, outside fenced code blocks."""
    return LINK.findall(FENCE.sub("", path.read_text()))


def test_recipe_reference_is_up_to_date() -> None:
    committed = (DOCS / "recipe-reference.md").read_text()
    assert committed == recipe_reference(), (
        f"docs/recipe-reference.md is stale; regenerate it with:  {REGENERATE}"
    )


def test_recipe_reference_ignores_third_party_plugins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    baseline = recipe_reference(Registry())
    # A third-party distribution with a valid plugin, a clash with a core name, and a broken one.
    info = tmp_path / "third_party-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: third-party\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[sae_lightning.sparsity]\n"
        "extra = third_party_mod:Extra\n"
        "topk = third_party_mod:Extra\n"
        "broken = third_party_missing_mod:Nothing\n"
    )
    (tmp_path / "third_party_mod.py").write_text(
        "from sae_lightning.components.base import SparsityFn\n"
        "class Extra(SparsityFn):\n"
        '    """A third-party sparsity function."""\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = Registry()
    assert "extra" in plugins.names("sparsity")
    assert recipe_reference(plugins) == baseline


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_loads_and_resolves(path: Path) -> None:
    recipe = resolved_recipe(load_recipe([path]))
    assert recipe.model.sparsity["name"]


# Recipes whose data needs an artefact made by a documented command first (a trained FNO);
# tests/test_no_recipes.py makes a tiny one and builds and trains those recipes.
NEEDS_ARTEFACT = {"fno-activations-sae-fno.yaml"}


@pytest.mark.parametrize(
    "path",
    [p for p in RECIPES if p.name not in NEEDS_ARTEFACT],
    ids=[p.name for p in RECIPES if p.name not in NEEDS_ARTEFACT],
)
def test_recipe_builds(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Catches what validation alone cannot: d_in against the data, k against d_sae.
    monkeypatch.chdir(tmp_path)
    run = build_run(load_recipe([path]), log=False)
    assert run.module.sae.d_sae > 0
    assert list(tmp_path.iterdir()) == []


def test_readme_opens_with_the_two_commands() -> None:
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:15])
    assert "make quickstart" in head
    assert "make test" in head


def test_every_doc_is_linked_from_the_index() -> None:
    linked = {Path(target.split("#")[0]).name for target in links(DOCS / "index.md")}
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}
    assert pages - linked == set(), f"add these to docs/index.md: {sorted(pages - linked)}"


@pytest.mark.parametrize(
    "page", [ROOT / "README.md", *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name
)
def test_relative_links_resolve(page: Path) -> None:
    broken = [
        target
        for target in links(page)
        if not re.match(r"[a-z]+:|#", target) and not (page.parent / target.split("#")[0]).exists()
    ]
    assert broken == [], f"{page.relative_to(ROOT)} links to missing files: {broken}"
