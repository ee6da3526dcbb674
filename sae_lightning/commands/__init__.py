"""Extra ``sae-lightning`` subcommands, one module each.

A command module defines ``register(subparsers) -> None``, which adds its parser and sets
``func=run`` on it, where ``run(args: argparse.Namespace, rest: list[str]) -> int``. Modules are
listed in :data:`COMMAND_MODULES` and imported only when the CLI starts.
"""

COMMAND_MODULES: list[str] = []
"""Dotted module names of the extra subcommands, in the order ``--help`` lists them."""
COMMAND_MODULES += ["sae_lightning.commands.export", "sae_lightning.commands.report"]
COMMAND_MODULES += ["sae_lightning.commands.cache", "sae_lightning.commands.models"]
COMMAND_MODULES += ["sae_lightning.commands.inspect"]
