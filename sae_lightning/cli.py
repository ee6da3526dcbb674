"""The ``sae-lightning`` command, on LightningCLI's conventions without import-path recipes.

    sae-lightning fit --config recipes/quickstart.yaml --trainer.max_steps 500 --model.sparsity.k 16
    sae-lightning fit --config recipes/quickstart.yaml --print_config
    sae-lightning fit --config recipes/quickstart.yaml --ckpt_path last
    sae-lightning validate --config recipes/quickstart.yaml --ckpt_path last
    sae-lightning plugins [--json] [--strict]

Recipes name plugins registered through entry points, never Python import paths, so a recipe
cannot make the CLI import arbitrary code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from sae_lightning.commands import COMMAND_MODULES
from sae_lightning.errors import ConfigError, SaeLightningError


def split_overrides(tokens: Sequence[str]) -> list[tuple[str, str]]:
    """``["--a.b", "1", "--c=2"]`` -> ``[("a.b", "1"), ("c", "2")]``."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) <= 2:
            raise ConfigError(
                tok, "unexpected argument", "overrides look like --trainer.max_steps 500"
            )
        key = tok[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens):
                raise ConfigError(key, "has no value", f"write --{key} <value>")
            value = tokens[i + 1]
            i += 2
        out.append((key, value))
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-lightning",
        description="Train sparse autoencoders from YAML recipes. Any recipe field can be "
        "overridden as --<dotted.field> <value>, e.g. --model.sparsity.k 16.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("fit", "train a recipe"), ("validate", "evaluate a checkpoint")):
        p = sub.add_parser(
            name, help=text, description=f"{text}; extra --a.b value pairs override the recipe"
        )
        p.add_argument(
            "--config", "-c", action="append", default=[], help="recipe YAML (repeat to merge)"
        )
        p.add_argument("--ckpt_path", default=None, help="'last' or a .ckpt file to resume from")
        p.add_argument(
            "--print_config", action="store_true", help="print the resolved recipe and exit"
        )
    p = sub.add_parser("plugins", help="list installed plugins")
    p.add_argument("--json", action="store_true", help="JSON with each config's JSON schema")
    p.add_argument("--strict", action="store_true", help="exit 1 if any plugin fails to load")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = _parser().parse_known_args(argv)
    try:
        if getattr(args, "func", None) is not None:
            return int(args.func(args, list(rest)))
        if args.command == "plugins":
            if rest:
                raise ConfigError(rest[0], "unexpected argument for `plugins`")
            return _plugins(args.json, args.strict)
        return _train_or_validate(args, rest)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SaeLightningError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _train_or_validate(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from sae_lightning.recipe import dump_recipe, load_recipe

    if not args.config:
        raise ConfigError("--config", "is required", "pass --config recipes/quickstart.yaml")
    recipe = load_recipe(args.config, split_overrides(rest))
    if args.print_config:
        from sae_lightning.runner import resolved_recipe

        print(dump_recipe(resolved_recipe(recipe)), end="")
        return 0
    _quiet_dependencies()
    from lightning.pytorch.utilities import rank_zero_only

    from sae_lightning import runner
    from sae_lightning.report import print_metrics

    if args.command == "fit":
        metrics = runner.fit(recipe, args.ckpt_path)
        if metrics and rank_zero_only.rank == 0:  # under DDP every rank returns; print once
            print_metrics(metrics, title=f"{recipe.name}: final metrics")
            print(f"\nMonitor with:  tensorboard --logdir {recipe.output_dir}")
        return 0
    metrics = runner.validate(recipe, args.ckpt_path)
    if rank_zero_only.rank == 0:
        print_metrics(metrics, title=f"{recipe.name}: validation")
    return 0


def _quiet_dependencies() -> None:
    """Keep the terminal for our progress bar and tables: no dependency banners or warnings."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*litlogger.*")


def _plugins(as_json: bool, strict: bool) -> int:
    from sae_lightning.registry import registry

    infos = registry.describe()
    if as_json:
        print(json.dumps([info.__dict__ for info in infos], indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="sae-lightning plugins")
        for col in ("group", "name", "distribution", "version", "description"):
            table.add_column(col)
        for info in infos:
            desc = info.description if info.error is None else f"[red]BROKEN: {info.error}[/red]"
            table.add_row(info.group, info.name, info.dist, info.version, desc)
        Console().print(table)
    broken = [i for i in infos if i.error is not None]
    return 1 if strict and broken else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
