"""``inspect`` entry point: load the run's SAE and data, then the LM or function-space path."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from sae_lightning.errors import ConfigError
from sae_lightning.inspect.options import InspectOptions
from sae_lightning.recipe import RecipeConfig


def data_spec(recipe: RecipeConfig, options: InspectOptions) -> dict:
    """The recipe's data spec, reading ``options.text`` instead of its corpus when given."""
    from sae_lightning.config import split_spec

    name, params = split_spec(recipe.data, "data")
    if options.text:
        params = {**params, "text": list(options.text), "val_sequences": 0, "cache_dir": None}
        for split in ("max_sequences", "val_documents", "val_fraction", "eval_text"):
            params.pop(split, None)  # every context of the given text is read
    return {"name": name, **params}


def inspect_run(
    run_dir: Path, recipe: RecipeConfig, options: InspectOptions, console: Console
) -> Path:
    """Write the feature browser of the run in ``run_dir``; return its ``index.html``.

    Raises:
        ConfigError: no exported SAE in ``run_dir``, or data that is neither a language model
            nor functions.
    """
    from sae_lightning.data.activations import ActivationDataModule
    from sae_lightning.io import load_sae
    from sae_lightning.registry import registry

    try:
        sae = load_sae(run_dir, options.torch_device())
    except FileNotFoundError as err:
        raise ConfigError(
            "RUN_DIR", str(err), "pass a finished run folder (runs/<name>/version_N)"
        ) from None
    sae = sae.to(options.torch_dtype)
    spec = data_spec(recipe, options)
    dm = registry.build("datamodules", spec, field="data", seed=recipe.seed)
    if isinstance(dm, ActivationDataModule):
        from sae_lightning.inspect.lm_run import inspect_lm

        return inspect_lm(run_dir, sae, dm, options, console)
    if options.text:
        raise ConfigError("--text", "applies to language-model runs only")
    from sae_lightning.inspect.functions import inspect_functions

    return inspect_functions(run_dir, sae, dm, options, console)
