"""``sae-lightning cache --config RECIPE [--a.b value ...]``: harvest LM activations to disk.

The recipe's ``data`` must be ``lm_activations`` with ``cache_dir`` set; training the same
recipe then reads the cache instead of running the LM. The size is estimated and printed
before anything is written, progress follows the contexts and tokens (a plain line every
``--progress-seconds`` when the output is not a terminal), re-running after a crash resumes
from the last whole shard, and the harvest throughput is compared with the LM forward alone.
"""

from __future__ import annotations

import argparse

from sae_lightning.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cache",
        help="write a recipe's LM activations to a sharded safetensors cache",
        description="Harvest the activations an lm_activations recipe trains on into "
        "data.cache_dir (sharded safetensors + manifest.json); extra --a.b value pairs "
        "override the recipe.",
    )
    p.add_argument("--config", "-c", action="append", default=[], help="recipe YAML (repeat)")
    p.add_argument(
        "--progress-seconds",
        type=float,
        default=30.0,
        help="seconds between progress lines when the output is not a terminal (default 30)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from rich.console import Console

    from sae_lightning.cli import split_overrides
    from sae_lightning.config import split_spec
    from sae_lightning.data.activations import ActivationDataModule
    from sae_lightning.data.cache_writer import write_cache
    from sae_lightning.recipe import load_recipe
    from sae_lightning.registry import registry

    if not args.config:
        raise ConfigError("--config", "is required", "pass an lm_activations recipe")
    recipe = load_recipe(args.config, split_overrides(rest))
    datamodule = registry.build("datamodules", recipe.data, field="data", seed=recipe.seed)
    if not isinstance(datamodule, ActivationDataModule):
        name, _ = split_spec(recipe.data, "data")
        raise ConfigError("data.name", f"is {name!r}; only lm_activations data can be cached")
    if args.progress_seconds <= 0:
        raise ConfigError(
            "--progress-seconds", f"is {args.progress_seconds}", "use a positive number"
        )
    write_cache(datamodule, Console(), args.progress_seconds)
    return 0
