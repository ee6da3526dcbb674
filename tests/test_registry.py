"""The registry's four user-facing error cases, with their exact messages, and discovery."""

from __future__ import annotations

import importlib
import sys

import pytest
from fake_dists import make_dist

from sae_lightning.errors import (
    ConfigError,
    DuplicatePluginError,
    PluginLoadError,
    PluginNotFoundError,
    RegistryError,
)
from sae_lightning.registry import Registry

GOOD = """
from sae_lightning.components.sparsity.topk import TopK

class MyTopK(TopK):
    '''A copy of TopK from another distribution.'''
"""

BROKEN = """
import module_that_does_not_exist_anywhere
"""

NOT_A_PLUGIN = """
class NotAPlugin:
    pass
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A directory on sys.path where tests drop fake distributions."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    importlib.invalidate_caches()
    for name in ("sae_fake_good", "sae_fake_broken", "sae_fake_bad"):
        sys.modules.pop(name, None)


def test_core_components_found_through_entry_points():
    reg = Registry()
    assert {"relu", "topk", "batchtopk", "jumprelu"} <= set(reg.names("sparsity"))
    assert {"linear", "tied"} <= set(reg.names("decoders"))
    assert "linear" in reg.names("encoders")
    found = reg.resolve("sparsity", "topk")
    assert found.dist == "sae-lightning"
    assert found.target == "sae_lightning.components.sparsity.topk:TopK"


def test_unknown_name_lists_installed_and_closest_match():
    reg = Registry()
    installed = ", ".join(reg.names("sparsity"))
    with pytest.raises(PluginNotFoundError) as info:
        reg.get("sparsity", "topkk")
    assert str(info.value) == (
        f"no sparsity plugin 'topkk'; installed: {installed}; did you mean 'topk'?"
    )


def test_unknown_name_in_recipe_names_the_field():
    reg = Registry()
    with pytest.raises(ConfigError) as info:
        reg.build("sparsity", {"name": "topkk"}, field="model.sparsity", d_in=8, d_sae=16)
    assert info.value.field == "model.sparsity.name"
    assert "did you mean 'topk'?" in str(info.value)


def test_broken_plugin_names_entry_point_distribution_and_cause(site):
    make_dist(
        site,
        "sae-fake-broken",
        {"sae_lightning.sparsity": {"broken": "sae_fake_broken:Broken"}},
        {"sae_fake_broken": BROKEN},
    )
    reg = Registry()
    with pytest.raises(PluginLoadError) as info:
        reg.get("sparsity", "broken")
    assert str(info.value) == (
        "sparsity plugin 'broken' from distribution 'sae-fake-broken 0.1.0' "
        "(entry point 'broken = sae_fake_broken:Broken') failed to import: "
        "ModuleNotFoundError: No module named 'module_that_does_not_exist_anywhere'"
    )
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    # Every other plugin still works, and the broken one is reported, not raised, by describe().
    assert reg.get("sparsity", "topk").__name__ == "TopK"
    described = {(i.group, i.name): i for i in reg.describe()}
    assert described[("sparsity", "broken")].error == str(info.value)
    assert described[("sparsity", "topk")].error is None
    # An unknown name now also reports the broken plugin.
    with pytest.raises(
        PluginNotFoundError, match=r"failed to load: broken \(ModuleNotFoundError\)"
    ):
        reg.get("sparsity", "nope")


def test_duplicate_names_error_names_both_and_qualified_names_pick_one(site):
    make_dist(
        site,
        "sae-fake-good",
        {"sae_lightning.sparsity": {"topk": "sae_fake_good:MyTopK"}},
        {"sae_fake_good": GOOD},
    )
    reg = Registry()
    with pytest.raises(DuplicatePluginError) as info:
        reg.get("sparsity", "topk")
    assert str(info.value) == (
        "sparsity plugin name 'topk' is registered by two distributions: "
        "'sae-fake-good' (sae_fake_good:MyTopK) and "
        "'sae-lightning' (sae_lightning.components.sparsity.topk:TopK); "
        "pick one as 'sae-fake-good:topk' or 'sae-lightning:topk'"
    )
    assert reg.get("sparsity", "sae-lightning:topk").__name__ == "TopK"
    assert reg.get("sparsity", "sae-fake-good:topk").__name__ == "MyTopK"
    assert reg.get("sparsity", "sae_fake_good:topk").__name__ == "MyTopK"  # normalised name
    with pytest.raises(PluginNotFoundError, match="no sparsity plugin 'topk' from distribution"):
        reg.get("sparsity", "other-dist:topk")


def test_object_that_is_not_a_plugin_is_rejected(site):
    make_dist(
        site,
        "sae-fake-bad",
        {"sae_lightning.sparsity": {"bad": "sae_fake_bad:NotAPlugin"}},
        {"sae_fake_bad": NOT_A_PLUGIN},
    )
    with pytest.raises(PluginLoadError, match="is not a subclass of SparsityFn"):
        Registry().get("sparsity", "bad")


def test_plugin_params_validated_by_the_plugins_own_schema():
    reg = Registry()
    with pytest.raises(ConfigError) as info:
        reg.build("sparsity", {"name": "topk", "k": -3}, field="model.sparsity", d_in=8, d_sae=16)
    assert info.value.field == "model.sparsity.k"
    assert "greater than 0" in str(info.value)
    with pytest.raises(ConfigError) as info:
        reg.build("sparsity", {"name": "topk", "kk": 3}, field="model.sparsity", d_in=8, d_sae=16)
    assert info.value.field == "model.sparsity.kk"
    assert "unknown key 'kk'; did you mean 'k'?" in str(info.value)
    with pytest.raises(ConfigError) as info:
        reg.build("sparsity", {"name": "topk", "k": 17}, field="model.sparsity", d_in=8, d_sae=16)
    assert info.value.field == "model.sparsity.k"
    assert "k=17 is larger than the dictionary (d_sae=16)" in str(info.value)


def test_unknown_group_is_explained():
    with pytest.raises(
        RegistryError, match=r"unknown plugin group 'sparsityy'.*did you mean 'sparsity'"
    ):
        Registry().names("sparsityy")
