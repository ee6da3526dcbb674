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
import os
import shlex
import shutil
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from sae_lightning.commands import COMMAND_MODULES
from sae_lightning.errors import ConfigError, NonFiniteError, SaeLightningError

if TYPE_CHECKING:
    from sae_lightning.registry import PluginInfo


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


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors in the CLI's own two-line form (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message}\n  fix: see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    except BrokenPipeError:  # the reader went away (e.g. `| head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except NonFiniteError as err:  # the run diverged: not a bad input
        _report(err)
        return 1
    except SaeLightningError as err:
        _report(err)
        return 2


def _report(err: SaeLightningError) -> None:
    """Print ``err`` to stderr in at most three lines, once per job (rank 0 of a DDP job)."""
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        return  # every rank meets the same error; rank 0 says it
    if isinstance(err, ConfigError):
        head = f"{err.field}: {err.message}" if err.field else err.message
        lines = [head] + ([f"fix: {err.fix}"] if err.fix else [])
    else:
        lines = [str(err)]
    lines = [" ".join(line.split()) for line in lines]  # each message on one line
    print(f"error: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(f"  {line}", file=sys.stderr)


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
            run_dir = latest_run_dir(Path(recipe.output_dir) / recipe.name)
            if run_dir is not None:
                print("\n" + next_steps(run_dir, Path(recipe.output_dir)))
        return 0
    metrics = runner.validate(recipe, args.ckpt_path)
    if rank_zero_only.rank == 0:
        print_metrics(metrics, title=f"{recipe.name}: validation")
    return 0


def latest_run_dir(root: Path) -> Path | None:
    """The newest ``version_N`` folder under ``root`` that holds a finished run's metrics."""
    from sae_lightning.io import METRICS_FILE

    found = [
        (int(d.name.removeprefix("version_")), d)
        for d in root.glob("version_*")
        if d.name.removeprefix("version_").isdigit() and (d / METRICS_FILE).is_file()
    ]
    return max(found)[1] if found else None


def executable(name: str) -> str:
    """``name`` if it is on PATH, else its full path beside this Python (an unactivated venv)."""
    if shutil.which(name) is not None:
        return name
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else name


def next_steps(run_dir: Path, output_dir: Path) -> str:
    """The run folder and copy-paste commands to load, report on, export and monitor it."""
    cli = executable("sae-lightning")
    folder = shlex.quote(str(run_dir))
    load = f"from sae_lightning import load_sae; sae = load_sae({json.dumps(str(run_dir))})"
    return "\n".join(
        [
            f"Run folder: {run_dir}",
            "Next steps:",
            f"  load it:     {shlex.quote(sys.executable)} -c {shlex.quote(load)}",
            f"  report:      {cli} report {folder}",
            f"  export:      {cli} export {folder} --format saelens --out "
            f"{shlex.quote(str(run_dir / 'saelens'))}",
            f"  TensorBoard: {executable('tensorboard')} --logdir {shlex.quote(str(output_dir))}",
        ]
    )


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

    if as_json or strict:  # needs each plugin imported: its Config's schema, its import errors
        infos = registry.describe()
        if as_json:
            print(json.dumps([info.__dict__ for info in infos], indent=2))
        else:
            print(plugins_table(infos, _terminal_width()))
        return 1 if strict and any(i.error is not None for i in infos) else 0
    print(plugins_table(registry.summaries(), _terminal_width()))
    return 0


def _terminal_width() -> int:
    """The terminal's width, 80 when stdout is not a terminal (a pipe, a file, CI logs)."""
    return shutil.get_terminal_size((80, 24)).columns if sys.stdout.isatty() else 80


def plugins_table(infos: Sequence[PluginInfo], width: int = 80) -> str:
    """Plugins grouped by kind, cut to ``width`` columns (never wrapped by the terminal).

    One line per plugin when it fits with 45 columns of description, else two lines: name and
    distribution, then the description.
    """
    lines: list[str] = []
    name_w = max((len(i.name) for i in infos), default=4) + 2
    source_w = max((len(f"{i.dist} {i.version}") for i in infos), default=6) + 2
    for group in dict.fromkeys(i.group for i in infos):
        lines.append(f"{group}:")
        for info in (i for i in infos if i.group == group):
            text = info.description if info.error is None else "BROKEN:"
            head = f"  {info.name:<{name_w}}{info.dist + ' ' + info.version:<{source_w}}"
            if len(head) + 45 > width:  # narrow: the description goes on its own line
                lines.append(head.rstrip())
                head = "      "
            line = head + text
            lines.append(line if len(line) <= width else line[: width - 3] + "...")
            if info.error is not None:  # the whole error, wrapped: it says what to fix
                lines += textwrap.wrap(info.error, width, initial_indent="    ")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
