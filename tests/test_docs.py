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


RECIPE_CLAIM = re.compile(r"`?(recipes/[\w.\-]+\.ya?ml)`?[^`\n]*:\s*$")
"""A line naming a shipped recipe and ending in a colon: "`recipes/quickstart.yaml`, annotated:"."""


def recipe_claims(text: str) -> list[tuple[str, str]]:
    """``(recipe path, YAML text)`` of each YAML block right after a line that names a recipe."""
    claims = []
    for match in re.finditer(r"^```ya?ml\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        before = [ln for ln in text[: match.start()].splitlines() if ln.strip()]
        claim = RECIPE_CLAIM.search(before[-1]) if before else None
        if claim is not None:
            claims.append((claim.group(1), match.group(1)))
    return claims


def test_recipe_claims_are_found() -> None:
    text = (
        "See `recipes/quickstart.yaml`, annotated:\n\n```yaml\nname: q\n```\n\n```yaml\na: 1\n```\n"
    )
    assert recipe_claims(text) == [("recipes/quickstart.yaml", "name: q\n")]


DOC_PAGES = [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]


@pytest.mark.parametrize("page", DOC_PAGES, ids=[str(p.relative_to(ROOT)) for p in DOC_PAGES])
def test_yaml_shown_as_a_shipped_recipe_is_that_recipe(page: Path) -> None:
    import yaml

    for recipe, block in recipe_claims(page.read_text()):
        shipped = ROOT / recipe
        assert shipped.is_file(), f"{page.name} shows {recipe}, which does not exist"
        assert yaml.safe_load(block) == yaml.safe_load(shipped.read_text()), (
            f"{page.name}: the YAML shown as {recipe} differs from the file"
        )


MISSING_FEATURE = re.compile(
    r"has not landed|not landed yet|not yet (?:wired|implemented|supported|available)"
    r"|until then|coming soon|will be added|\bTODO\b",
    re.IGNORECASE,
)


@pytest.mark.parametrize("page", DOC_PAGES, ids=[str(p.relative_to(ROOT)) for p in DOC_PAGES])
def test_no_page_says_a_feature_is_missing_or_coming(page: Path) -> None:
    found = [m.group(0) for m in MISSING_FEATURE.finditer(page.read_text())]
    assert not found, f"{page.name} says {found}: describe what the product does today"


def test_no_issue_numbers_in_docs_code_or_tests() -> None:
    pattern = re.compile(r"issue [0-9]+", re.IGNORECASE)
    hits = [
        str(path.relative_to(ROOT))
        for folder in ("docs", "sae_lightning", "plugins", "tests", "benchmarks")
        for path in (ROOT / folder).rglob("*")
        if path.suffix in {".md", ".py", ".yaml", ".toml"}
        and path.name != "test_docs.py"
        and pattern.search(path.read_text(errors="ignore"))
    ]
    assert not hits, f"these refer to issue numbers; say what the code does instead: {hits}"
