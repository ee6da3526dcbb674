"""Recipes: safe YAML, dotted command-line overrides, validation that names the YAML field."""

from __future__ import annotations

import copy
import functools
import inspect
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, create_model

from sae_lightning.config import ModelConfig, RecipeConfig, split_spec, validate_model
from sae_lightning.errors import ConfigError, did_you_mean
from sae_lightning.spec import PLUGIN_ROLES

TRAINER_DEFAULTS: dict[str, Any] = {
    "max_steps": 1000,
    "accelerator": "auto",
    "devices": 1,
    "val_check_interval": 250,
    "check_val_every_n_epoch": None,  # the training stream has no epochs
    "log_every_n_steps": 10,
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
}
"""The ``lightning.Trainer`` arguments a recipe's ``trainer:`` starts from."""

RESERVED_TRAINER_KEYS = {
    "logger": "runs log to TensorBoard under <output_dir>/<name>/",
    "callbacks": "list callback plugins under the recipe's top-level `callbacks:`",
    "default_root_dir": "set the recipe's `output_dir:`",
    "plugins": "sae-lightning installs its own checkpoint IO",
    "enable_checkpointing": "configure the recipe's `checkpoint:` section",
}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse one recipe file with ``yaml.safe_load`` (no Python object tags)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--config", f"file {str(p)!r} not found", "pass a path to a YAML recipe")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(str(p), f"is not valid YAML: {_yaml_problem(err)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            str(p), f"must hold a mapping at the top level, got {type(data).__name__}"
        )
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error in one line, with the line and column in the file."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``. A new plugin ``name`` replaces the
    whole spec, so parameters of the old plugin never leak into the new one."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        old = out.get(key)
        if (
            isinstance(old, dict)
            and isinstance(value, dict)
            and not ("name" in value and value.get("name") != old.get("name"))
        ):
            out[key] = deep_merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_value(text: str) -> Any:
    """Parse an override value as YAML (``16`` -> int, ``1e-3`` -> float, ``[a, b]`` -> list)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        # YAML 1.1 reads 1e-3 as a string; accept scientific notation as a float.
        try:
            return float(value) if any(c in value for c in "eE") else value
        except ValueError:
            return value
    return value


def apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``dotted = "a.b.c"``, creating mappings as needed."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if isinstance(nxt, str) and i >= 1:  # `sparsity: topk` shorthand -> mapping
            nxt = node[part] = {"name": nxt}
        if not isinstance(nxt, dict):
            raise ConfigError(
                ".".join(parts[: i + 1]),
                f"is {type(nxt).__name__} {nxt!r}, so --{dotted} cannot set a key inside it",
            )
        node = nxt
    last = parts[-1]
    old = node.get(last)
    if len(parts) > 1 and last == "name" and isinstance(old, str) and old != value:
        node.clear()  # switching plugin: drop the old plugin's parameters
    node[last] = value


def load_recipe(
    configs: Sequence[str | Path] = (), overrides: Iterable[tuple[str, str]] = ()
) -> RecipeConfig:
    """Merge recipe files left to right, apply ``(dotted_key, value_text)`` overrides, validate.

    Raises:
        ConfigError: naming the YAML field (or file) that is wrong.
    """
    data: dict[str, Any] = {}
    for path in configs:
        data = deep_merge(data, read_yaml(path))
    if not data and configs:
        raise ConfigError(
            str(configs[-1]),
            "is empty",
            "a recipe needs at least `name: <run name>`; start from recipes/quickstart.yaml",
        )
    for key, text in overrides:
        apply_override(data, key, parse_value(text))
    recipe = validate_model(RecipeConfig, data, "")
    # The model's plugins and variants first: checking them imports no Lightning, so most bad
    # recipes are answered in the time it takes to import torch.
    specs = recipe.model.model_dump(include={role for role, _ in PLUGIN_ROLES})
    for role, group in PLUGIN_ROLES:
        resolve_plugin(group, specs[role], f"model.{role}")
    variant_models(recipe)  # validate now, so a bad variant fails before any data is built
    recipe.trainer = check_trainer_args(recipe.trainer)
    return recipe


SAE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
"""Names of SAEs in a multi-SAE run: they become log prefixes and export folders."""

_WIDTHS = ("d_sae", "expansion_factor")


def variant_models(recipe: RecipeConfig) -> dict[str, ModelConfig]:
    """``{name: ModelConfig}``: the recipe's ``model`` with each of its ``variants`` merged in.

    A variant is ``{name: ..., <partial model: mapping>}``, e.g. ``{name: k8, sparsity: {k: 8}}``.
    A new plugin ``name`` replaces that plugin's whole spec, as command-line overrides do; a
    variant that sets ``d_sae`` or ``expansion_factor`` drops the other from the base. Names
    default to ``variant<N>``. Empty when the recipe has no variants.

    Raises:
        ConfigError: naming ``variants.<N>.<field>``: a bad or repeated name, an invalid model
            field or plugin parameter.
    """
    base = recipe.model.model_dump()
    out: dict[str, ModelConfig] = {}
    for i, variant in enumerate(recipe.variants):
        field = f"variants.{i}"
        overrides = dict(variant)
        name = overrides.pop("name", f"variant{i}")
        if not isinstance(name, str) or not SAE_NAME.match(name):
            raise ConfigError(
                f"{field}.name",
                f"{name!r} is not a valid SAE name",
                "use letters, digits, '_', '.' and '-' (it becomes a log prefix and a folder)",
            )
        if name in out:
            raise ConfigError(
                f"{field}.name", f"'{name}' names an earlier variant too", "give each its own name"
            )
        start = {k: v for k, v in base.items() if not (k in _WIDTHS and _sets_width(overrides))}
        model = validate_model(ModelConfig, deep_merge(start, overrides), field)
        specs = model.model_dump(include={role for role, _ in PLUGIN_ROLES})
        for role, group in PLUGIN_ROLES:
            resolve_plugin(group, specs[role], f"{field}.{role}")
        out[name] = model
    return out


def _sets_width(overrides: dict[str, Any]) -> bool:
    return any(overrides.get(k) is not None for k in _WIDTHS)


def resolve_plugin(group: str, spec: Any, field: str) -> dict[str, Any]:
    """A plugin spec validated against the installed plugin's own schema, every parameter
    filled in: ``{"name": ..., **params}``.

    Raises:
        ConfigError: naming ``field`` for an unknown plugin or a bad parameter.
    """
    from sae_lightning.registry import registry

    name, params = split_spec(spec, field)
    cls = registry.get_for_field(group, name, field)
    config = registry.validate_params(cls, params, field)
    return {"name": name, **config.model_dump(mode="json")}


def resolved_recipe(recipe: RecipeConfig) -> RecipeConfig:
    """``recipe`` with every plugin's defaults and the Trainer defaults filled in."""
    specs = recipe.model.model_dump(include={role for role, _ in PLUGIN_ROLES})
    model = recipe.model.model_copy(
        update={
            role: resolve_plugin(group, specs[role], f"model.{role}")
            for role, group in PLUGIN_ROLES
        }
    )
    return recipe.model_copy(
        update={
            "model": model,
            "data": resolve_plugin("datamodules", recipe.data, "data"),
            "trainer": {**TRAINER_DEFAULTS, **recipe.trainer},
            "callbacks": [
                resolve_plugin("callbacks", s, f"callbacks.{i}")
                for i, s in enumerate(recipe.callbacks)
            ],
        }
    )


@functools.cache
def _trainer_args_model() -> type[BaseModel]:
    """A pydantic model of ``lightning.Trainer``'s keyword arguments, from its signature."""
    from lightning.pytorch import Trainer

    fields: dict[str, Any] = {}
    for name, param in inspect.signature(Trainer.__init__).parameters.items():
        if name == "self" or name in RESERVED_TRAINER_KEYS:
            continue
        annotation = Any if param.annotation is inspect.Parameter.empty else param.annotation
        fields[name] = (annotation, param.default)
    # Not a Trainer argument: with strategy: model_parallel the runner builds Lightning's
    # ModelParallelStrategy from it (sae_lightning.parallel.strategy).
    fields["tensor_parallel_size"] = (int | None, None)
    # Not a Trainer argument either: spreads the SAEs of `variants:` over the processes
    # (sae_lightning.parallel.strategy).
    fields["distribute_saes"] = (bool, False)
    config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", allow_inf_nan=False)
    return create_model("TrainerArgs", __config__=config, **fields)


def check_trainer_args(trainer_args: dict[str, Any]) -> dict[str, Any]:
    """Validate ``trainer:`` against ``lightning.Trainer``'s signature; return coerced values.

    The SAE stream has no epochs, so training must be bounded by ``max_steps`` and validated
    every ``val_check_interval`` steps.
    """
    model = _trainer_args_model()
    valid = sorted(model.model_fields)
    for key in trainer_args:
        if key in RESERVED_TRAINER_KEYS:
            raise ConfigError(
                f"trainer.{key}", "is set by sae-lightning", RESERVED_TRAINER_KEYS[key]
            )
        if key not in model.model_fields:
            raise ConfigError(
                f"trainer.{key}",
                f"unknown key '{key}'{did_you_mean(key, valid)}",
                "see lightning.Trainer's arguments",
            )
    args = validate_model(model, trainer_args, "trainer").model_dump(exclude_unset=True)
    steps = args.get("max_steps", 1)
    if steps < 1:
        raise ConfigError(
            "trainer.max_steps", f"must be >= 1, got {steps}", "the stream is endless"
        )
    interval = args.get("val_check_interval", 1)
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        raise ConfigError(
            "trainer.val_check_interval",
            f"must be a whole number of steps >= 1, got {interval!r}",
            "the training stream has no epochs to take a fraction of",
        )
    return args


def dump_recipe(recipe: RecipeConfig) -> str:
    """The fully resolved recipe as YAML (what ``--print_config`` shows)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
