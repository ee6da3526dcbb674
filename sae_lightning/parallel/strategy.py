"""``trainer.strategy: model_parallel`` in a recipe -> Lightning's ``ModelParallelStrategy``.

The recipe names the strategy and ``trainer.tensor_parallel_size: T``; the data-parallel size
is what is left of the processes (``devices x num_nodes / T``). Lightning builds the 2-D mesh
``(data_parallel, tensor_parallel)`` and calls the module's ``configure_model``.
"""

from __future__ import annotations

from typing import Any

from sae_lightning.config import RecipeConfig
from sae_lightning.errors import ConfigError

STRATEGY = "model_parallel"


def is_model_parallel(recipe: RecipeConfig) -> bool:
    """True when the recipe asks for latent sharding."""
    return recipe.trainer.get("strategy") == STRATEGY


def distributes_saes(recipe: RecipeConfig) -> bool:
    """True when the recipe spreads its variants over the processes (``distribute_saes``)."""
    return bool(recipe.trainer.get("distribute_saes"))


def check_model_parallel(recipe: RecipeConfig) -> None:
    """Refuse what latent sharding and per-SAE distribution do not run, before anything is
    built.

    Raises:
        ConfigError: ``variants`` or an e2e loss with ``trainer.strategy: model_parallel``;
            ``trainer.distribute_saes`` without variants, with another strategy, or with more
            processes than SAEs.
    """
    if distributes_saes(recipe):
        _check_distribute(recipe)
    if not is_model_parallel(recipe):
        return
    if recipe.variants:
        raise ConfigError(
            "variants",
            f"several SAEs in one run are not sharded (trainer.strategy: {STRATEGY})",
            "train each variant in its own run, or use trainer.strategy: ddp",
        )
    if recipe.model.loss.mode != "local":
        raise ConfigError(
            "model.loss.mode",
            f"'{recipe.model.loss.mode}' is not available with trainer.strategy: {STRATEGY}",
            "use model.loss.mode: local, or trainer.strategy: ddp",
        )


def _check_distribute(recipe: RecipeConfig) -> None:
    field = "trainer.distribute_saes"
    if not recipe.variants:
        raise ConfigError(
            field,
            "spreads several SAEs over the processes, but the recipe trains one",
            "list the SAEs under variants:, or remove trainer.distribute_saes",
        )
    strategy = recipe.trainer.get("strategy", "auto")
    if strategy not in DISTRIBUTE_STRATEGIES:
        raise ConfigError(
            field,
            f"cannot be combined with trainer.strategy: {strategy} (each process trains whole "
            "SAEs of its own on the whole batch)",
            "remove trainer.strategy (or set it to ddp), or remove trainer.distribute_saes",
        )
    devices, nodes = recipe.trainer.get("devices", 1), recipe.trainer.get("num_nodes", 1)
    if not isinstance(devices, int) or not isinstance(nodes, int) or devices < 1:
        raise ConfigError(
            "trainer.devices",
            f"is {devices!r}; trainer.distribute_saes needs the number of processes per node",
            "set trainer.devices to a positive integer",
        )
    if devices * nodes > len(recipe.variants):
        raise ConfigError(
            field,
            f"{len(recipe.variants)} SAEs cannot be spread over {devices * nodes} processes "
            "(trainer.devices x trainer.num_nodes): a process would train none",
            f"use at most {len(recipe.variants)} processes, or add variants",
        )


DISTRIBUTE_STRATEGIES = ("auto", "ddp")
"""What ``trainer.strategy`` may say with ``distribute_saes``: the runner replaces it."""


def model_parallel_arguments(trainer_args: dict[str, Any]) -> dict[str, Any]:
    """``trainer_args`` with ``strategy: model_parallel`` + ``tensor_parallel_size`` turned into
    a ``ModelParallelStrategy`` (:class:`~.checkpoint.ShardedStrategy`); other strategies pass
    through unchanged.

    Raises:
        ConfigError: ``tensor_parallel_size`` without the strategy, or sizes that do not fit.
    """
    args = dict(trainer_args)
    tp = args.pop("tensor_parallel_size", None)
    if args.pop("distribute_saes", False):
        return _distribute_arguments(args, tp)
    if args.get("strategy") != STRATEGY:
        if tp is not None:
            raise ConfigError(
                "trainer.tensor_parallel_size",
                f"is set but trainer.strategy is {args.get('strategy', 'auto')!r}",
                f"set trainer.strategy: {STRATEGY}, or remove tensor_parallel_size",
            )
        return args
    tp = 1 if tp is None else tp
    devices, nodes = args.get("devices", 1), args.get("num_nodes", 1)
    if not isinstance(tp, int) or tp < 1:
        raise ConfigError(
            "trainer.tensor_parallel_size", f"is {tp!r}", "set a positive number of processes"
        )
    if not isinstance(devices, int) or not isinstance(nodes, int):
        raise ConfigError(
            "trainer.devices",
            f"is {devices!r}; {STRATEGY} needs the number of processes per node",
            "set trainer.devices to an integer",
        )
    world = devices * nodes
    if world % tp:
        raise ConfigError(
            "trainer.tensor_parallel_size",
            f"{tp} does not divide the {world} processes (trainer.devices x trainer.num_nodes)",
            "choose a tensor_parallel_size that divides devices x num_nodes",
        )
    from sae_lightning.parallel.checkpoint import ShardedStrategy

    args["strategy"] = ShardedStrategy(data_parallel_size=world // tp, tensor_parallel_size=tp)
    return args


def _distribute_arguments(args: dict[str, Any], tp: int | None) -> dict[str, Any]:
    """``distribute_saes``: every process is its own one-rank data-parallel group (it reads the
    whole batch and syncs no gradient), on Lightning's ``ModelParallelStrategy`` with a
    ``1 x W`` mesh, whose distributed checkpoints hold every process's own SAEs."""
    if tp is not None:
        raise ConfigError(
            "trainer.tensor_parallel_size",
            "is set with trainer.distribute_saes, which shards no SAE",
            "remove one of them",
        )
    world = args.get("devices", 1) * args.get("num_nodes", 1)
    if world == 1:  # one process trains every SAE: nothing to spread
        return args
    from sae_lightning.parallel.checkpoint import SpreadStrategy

    args["strategy"] = SpreadStrategy(data_parallel_size=1, tensor_parallel_size=world)
    return args
