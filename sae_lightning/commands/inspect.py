"""``sae-lightning inspect RUN_DIR --config RECIPE [--tokens N] [--text FILE ...]``.

Writes a static feature browser into ``RUN_DIR/inspect/``: an index of every latent (sortable
by density and maximum activation, dead and dense latents flagged) and a page per latent with
its top-activating contexts (tokens highlighted by activation), activation histogram, logit
effects and nearest atoms; for function-space runs, each concept's top-activating fields with
its activation map overlaid. Also adds the decoder atoms to TensorBoard's projector.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from sae_lightning.errors import ConfigError

RECIPE_FILE = "recipe.yaml"
"""A recipe stored in the run folder is used when no --config is given."""


def register(subparsers: argparse._SubParsersAction) -> None:
    from sae_lightning.inspect.options import InspectOptions

    d = InspectOptions()
    p = subparsers.add_parser(
        "inspect",
        help="feature browser: top contexts, histograms and logit effects of every latent",
        description="Stream text through the LM and a trained SAE and write a static HTML "
        "feature browser into RUN_DIR/inspect (no server needed). Extra --a.b value pairs "
        "override the recipe.",
    )
    p.add_argument("run_dir", help="a finished run folder: runs/<name>/version_N")
    p.add_argument(
        "--config", "-c", action="append", default=[], help="the run's recipe YAML (repeatable)"
    )
    p.add_argument("--tokens", type=int, default=d.tokens, help="tokens (or samples) to stream")
    p.add_argument("--text", nargs="+", default=None, help="text files instead of the corpus")
    p.add_argument(
        "--source",
        choices=["auto", "lm", "cache"],
        default=d.source,
        help="the recipe's activation cache, the LM, or auto: the cache when it is complete",
    )
    p.add_argument("--hook", default=None, help="hook of a multi-hook run (default the first)")
    p.add_argument("--top", type=int, default=d.n_top, help="top contexts kept per latent")
    p.add_argument("--before", type=int, default=d.before, help="window tokens before a max")
    p.add_argument("--after", type=int, default=d.after, help="window tokens after a max")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="contexts per chunk")
    p.add_argument("--effects", type=int, default=d.effects, help="logit effects per latent")
    p.add_argument("--near", type=int, default=d.near, help="nearest atoms per latent")
    p.add_argument(
        "--dense_threshold", type=float, default=d.dense_threshold, help="density flagged dense"
    )
    p.add_argument("--dtype", choices=["float32", "float64"], default=d.dtype, help="SAE dtype")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--no_projector", action="store_true", help="skip the TensorBoard projector")
    p.add_argument("--out", default=None, help="browser folder (default RUN_DIR/inspect)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from rich.console import Console

    from sae_lightning.cli import split_overrides
    from sae_lightning.inspect.options import InspectOptions
    from sae_lightning.inspect.run import inspect_run
    from sae_lightning.recipe import load_recipe

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError("RUN_DIR", f"{run_dir} is not a folder", "pass runs/<name>/version_N")
    configs = args.config or ([run_dir / RECIPE_FILE] if (run_dir / RECIPE_FILE).is_file() else [])
    if not configs:
        raise ConfigError("--config", "is required", "pass the recipe the run was trained with")
    for name, value in (
        ("tokens", args.tokens),
        ("top", args.top),
        ("batch_size", args.batch_size),
    ):
        if value <= 0:
            raise ConfigError(f"--{name}", f"is {value}", "pass a positive number")
    # The other InspectOptions fields have the flag of the same name.
    renamed = {
        "n_top": args.top,
        "projector": not args.no_projector,
        "out": Path(args.out) if args.out else None,
    }
    same = {f.name: getattr(args, f.name) for f in fields(InspectOptions) if f.name not in renamed}
    options = InspectOptions(**same, **renamed)
    recipe = load_recipe(configs, split_overrides(rest))
    index = inspect_run(run_dir, recipe, options, Console())
    print(f"\nwrote {index}")
    return 0
