"""Fuzzing: every recipe either trains or fails with a ConfigError naming a field.

Hypothesis mutates a tiny valid recipe with adversarial values (wrong types, negatives, zero,
NaN/Inf, unknown keys, unknown plugin names). Any exception other than ConfigError, e.g. a
traceback from deep inside torch or Lightning, fails the test.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sae_lightning.errors import ConfigError
from sae_lightning.recipe import apply_override, load_recipe
from sae_lightning.runner import build_run, preflight

BASE: dict[str, Any] = {
    "name": "fuzz",
    "data": {"name": "synthetic", "d": 8, "n_atoms": 32, "batch_size": 32, "val_samples": 64},
    "model": {"d_sae": 16, "sparsity": {"name": "topk", "k": 2}},
    "trainer": {
        "max_steps": 2,
        "val_check_interval": 2,
        "enable_progress_bar": False,
        "accelerator": "cpu",
    },
}

FIELDS = [
    "seed",
    "name",
    "model.d_in",
    "model.d_sae",
    "model.expansion_factor",
    "model.encoder.name",
    "model.encoder.center_input",
    "model.encoder.init_scale",
    "model.decoder.name",
    "model.decoder.unit_norm",
    "model.sparsity.name",
    "model.sparsity.k",
    "model.sparsity.aux_k",
    "model.sparsity.aux_coefficient",
    "model.sparsity.l1_coefficient",
    "model.sparsity.bandwidth",
    "model.sparsity.init_threshold",
    "model.sparsity.threshold_momentum",
    "model.optimizer.lr",
    "model.optimizer.betas",
    "model.optimizer.warmup_steps",
    "model.optimizer.decay",
    "model.optimizer.min_lr_ratio",
    "model.loss.reconstruction",
    "model.loss.dead_window_tokens",
    "data.name",
    "data.d",
    "data.n_atoms",
    "data.n_active",
    "data.zipf_exponent",
    "data.amplitude_min",
    "data.amplitude_max",
    "data.noise_std",
    "data.batch_size",
    "data.val_samples",
    "data.val_batch_size",
    "data.nonfinite",
    "trainer.max_steps",
    "trainer.val_check_interval",
    "trainer.precision",
    "trainer.accelerator",
    "trainer.gradient_clip_val",
    "checkpoint.every_n_steps",
    "checkpoint.keep",
    "unknown_key",
    "model.unknown_key",
    "model.sparsity.unknown_key",
]

PLUGIN_NAMES = ["topk", "batchtopk", "relu", "jumprelu", "linear", "tied", "synthetic", "topkk"]

ADVERSARIAL = st.one_of(
    st.integers(min_value=-3, max_value=40),
    st.sampled_from([0.0, -1.0, 0.5, 1e-3, 2.5, math.nan, math.inf, -math.inf]),
    st.sampled_from([*PLUGIN_NAMES, "", "fail", "drop", "mse", "fvu", "cosine", "bf16-mixed"]),
    st.booleans(),
    st.none(),
    st.lists(st.integers(min_value=-1, max_value=3), max_size=3),
    st.dictionaries(st.sampled_from(["name", "k", "x"]), st.integers(-1, 3), max_size=2),
)
PLAUSIBLE = st.one_of(
    st.integers(min_value=1, max_value=8),
    st.sampled_from([0.1, 0.5, 1.0, 1e-3]),
    st.booleans(),
)
# Mostly plausible values, so that many examples get as far as training.
VALUES = st.integers(0, 9).flatmap(lambda r: PLAUSIBLE if r < 5 else ADVERSARIAL)

MUTATIONS = st.lists(st.tuples(st.sampled_from(FIELDS), VALUES), min_size=1, max_size=2)


def mutated(mutations: list[tuple[str, Any]]) -> dict[str, Any]:
    recipe = copy.deepcopy(BASE)
    for path, value in mutations:
        try:
            apply_override(recipe, path, value)
        except ConfigError:
            continue  # e.g. setting a key inside a value that is no longer a mapping
    # Keep every example short: training length is not what is being fuzzed.
    steps = (
        recipe.get("trainer", {}).get("max_steps")
        if isinstance(recipe.get("trainer"), dict)
        else None
    )
    if isinstance(steps, int) and steps > 3:
        recipe["trainer"]["max_steps"] = 3
    return recipe


def assert_names_a_field(err: ConfigError) -> None:
    assert err.field, f"ConfigError without a field: {err}"
    top = err.field.split(".")[0]
    assert top in {
        *BASE,
        "model",
        "data",
        "trainer",
        "checkpoint",
        "seed",
        "name",
        "unknown_key",
        "output_dir",
        "callbacks",
    }, err.field


def build_and_maybe_train(raw: dict[str, Any], tmp_path: Path, train: bool) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**raw, "output_dir": str(tmp_path / "runs")}))
    run = build_run(load_recipe([path]), log=False)
    preflight(run)
    if not train:
        return "built"
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return "trained"


def outcome(raw: dict[str, Any], tmp_path: Path, train: bool) -> None:
    try:
        event(build_and_maybe_train(raw, tmp_path, train))
    except ConfigError as err:
        event("ConfigError")
        assert_names_a_field(err)


SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture]}


@settings(max_examples=150, **SETTINGS)
@given(MUTATIONS)
def test_recipe_builds_or_fails_with_a_named_field(tmp_path, mutations):
    outcome(mutated(mutations), tmp_path, train=False)


@settings(max_examples=30, **SETTINGS)
@given(MUTATIONS)
def test_recipe_trains_or_fails_with_a_named_field(tmp_path, mutations):
    outcome(mutated(mutations), tmp_path, train=True)
