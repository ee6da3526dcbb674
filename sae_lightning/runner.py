"""From a validated recipe to a trained, exported SAE.

Data flows one way: recipe -> registry -> components -> module -> trainer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from sae_lightning.callbacks import NonFiniteGuard, ReferenceMetrics
from sae_lightning.callbacks.last_validation import LastValidation
from sae_lightning.callbacks.progress import LoggedMetricsBar
from sae_lightning.checkpoint_io import AtomicCheckpointIO, check_resume_shapes
from sae_lightning.config import ModelConfig, RecipeConfig
from sae_lightning.data.normalization import raw_input_sae
from sae_lightning.data.validation import BadBatchError, BatchValidator
from sae_lightning.errors import ConfigError
from sae_lightning.io import METRICS_FILE, export_sae, write_metrics
from sae_lightning.module import SAEModule, as_tensor
from sae_lightning.multi import MultiSAEModule, member_metrics
from sae_lightning.parallel.strategy import (
    check_model_parallel,
    distributes_saes,
    is_model_parallel,
    model_parallel_arguments,
)
from sae_lightning.precision import with_default_precision
from sae_lightning.protocols import DeclaresWidth, TrainsSAEs
from sae_lightning.recipe import TRAINER_DEFAULTS, resolved_recipe, variant_models
from sae_lightning.registry import registry
from sae_lightning.spec import SAESpec

__all__ = ["TRAINER_DEFAULTS", "Run", "build_run", "finish", "fit", "fit_many", "resolved_recipe"]


ModuleFactory = Callable[[RecipeConfig, "int | None"], pl.LightningModule]
"""Builds the LightningModule of a recipe from the recipe and the data's width (None when the
data does not declare one). The module trains one SAE (:class:`SAEModule`) or several
(:class:`~sae_lightning.multi.MultiSAEModule`); it must be a
:class:`~sae_lightning.protocols.TrainsSAEs`."""


@dataclass
class Run:
    """Everything built from one recipe, ready for ``trainer.fit``."""

    recipe: RecipeConfig
    datamodule: pl.LightningDataModule
    module: pl.LightningModule
    trainer: pl.Trainer
    resolved: RecipeConfig
    """``recipe`` with every plugin's defaults filled in: resolved once, in :func:`build_run`."""

    @property
    def data_name(self) -> str:
        return str(self.resolved.data["name"])

    @property
    def trains(self) -> TrainsSAEs:
        """The module, as the SAE trainer the runner needs (see :data:`ModuleFactory`)."""
        if not isinstance(self.module, TrainsSAEs):
            raise TypeError(
                f"{type(self.module).__name__} does not train SAEs: it needs members(), "
                "takes_token_batches and configure_data_module() (see protocols.TrainsSAEs)"
            )
        return self.module

    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.logger.log_dir)  # type: ignore[union-attr]


def resolve_widths(recipe: RecipeConfig, data_d_in: int | None) -> tuple[int, int]:
    """``(d_in, d_sae)`` from the recipe and the data, checking that they agree."""
    model = recipe.model
    d_in = model.d_in
    data_name = _data_name(recipe)
    if d_in is None:
        if data_d_in is None:
            raise ConfigError(
                "model.d_in",
                f"is not set and the '{data_name}' data does not declare its width",
                "set model.d_in to the width of your activations",
            )
        d_in = data_d_in
    elif data_d_in is not None and d_in != data_d_in:
        raise ConfigError(
            "model.d_in",
            f"is {d_in} but the '{data_name}' data yields vectors of width {data_d_in}",
            f"set model.d_in: {data_d_in}, or remove it to take the data's width",
        )
    d_sae = (
        model.d_sae if model.d_sae is not None else round((model.expansion_factor or 8.0) * d_in)
    )
    return d_in, d_sae


def _data_name(recipe: RecipeConfig) -> str:
    return str(recipe.data.get("name") if isinstance(recipe.data, dict) else recipe.data)


def checkpoint_callback(recipe: RecipeConfig) -> ModelCheckpoint:
    """Periodic checkpoints plus ``last.ckpt``, as the recipe's ``checkpoint:`` section asks."""
    return ModelCheckpoint(
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=recipe.checkpoint.every_n_steps,
        save_top_k=recipe.checkpoint.keep,
        monitor="step",
        mode="max",
        save_last=True,
    )


def build_sae_module(recipe: RecipeConfig, data_d_in: int | None) -> SAEModule:
    """The :class:`SAEModule` of the recipe's ``model`` (compiled when ``model.compile``).

    With ``model.loss.mode`` ``e2e`` or ``e2e_ds`` it is the
    :class:`~sae_lightning.lm.e2e_module.E2ESAEModule`, trained through the frozen LM on token
    batches.
    """
    model = recipe.model
    module_cls = SAEModule
    if is_model_parallel(recipe):
        from sae_lightning.parallel.module import ShardedSAEModule

        module_cls = ShardedSAEModule
    if model.loss.mode != "local":
        from sae_lightning.lm.e2e_module import E2ESAEModule

        module_cls = E2ESAEModule
    module = module_cls(**module_kwargs(model, resolve_widths(recipe, data_d_in)))
    if model.compile:
        compile_sae(module.sae)
    return module


def module_kwargs(model: ModelConfig, widths: tuple[int, int]) -> dict[str, Any]:
    """:class:`SAEModule` keyword arguments of one ``model:`` section at ``(d_in, d_sae)``."""
    spec = SAESpec(*widths, model.encoder, model.decoder, model.sparsity)
    optimizer, loss = model.optimizer.model_dump(), model.loss.model_dump()
    return {**spec.as_kwargs(), "optimizer": optimizer, "loss": loss}


def build_module(recipe: RecipeConfig, data_d_in: int | None) -> pl.LightningModule:
    """The default :data:`ModuleFactory`: one SAE, or one per entry of ``variants``."""
    if recipe.variants:
        return build_multi_module(recipe, data_d_in)
    return build_sae_module(recipe, data_d_in)


def build_multi_module(recipe: RecipeConfig, data_d_in: int | None) -> MultiSAEModule:
    """A :class:`~sae_lightning.multi.MultiSAEModule` of the recipe's ``variants`` (the
    :data:`ModuleFactory` for recipes that list them); each variant is compiled when its
    ``compile`` is set.

    Raises:
        ConfigError: naming ``variants.<N>.<field>``.
    """
    models = variant_models(recipe)
    index = {name: i for i, name in enumerate(models)}
    saes = {}
    for name, model in models.items():
        try:
            widths = resolve_widths(recipe.model_copy(update={"model": model}), data_d_in)
        except ConfigError as err:  # model.<field> -> variants.<N>.<field>
            raise _under_variant(err, index[name]) from None
        saes[name] = module_kwargs(model, widths)
    try:
        module = MultiSAEModule(saes, seed=recipe.seed, distribute=distributes_saes(recipe))
    except ConfigError as err:  # saes.<name>.model.<field> -> variants.<N>.<field>
        found = re.match(r"^saes\.([^.]+)\.(.*)$", err.field)
        if found is None or found.group(1) not in index:
            raise
        inner = ConfigError(found.group(2), err.message, err.fix)
        raise _under_variant(inner, index[found.group(1)]) from None
    for name, model in models.items():
        if model.compile:
            compile_sae(module.saes[name].sae)
    return module


def _under_variant(err: ConfigError, i: int) -> ConfigError:
    field = re.sub(r"^model\.?", "", err.field)
    return ConfigError(f"variants.{i}.{field}" if field else f"variants.{i}", err.message, err.fix)


def compile_sae(sae: Any) -> None:
    """Compile the SAE's training and validation forward (``run``) with ``torch.compile``.

    Only the bound method is replaced, on this instance: parameters, state dict and the
    plugins are untouched, so checkpoints and exports are those of the eager SAE.
    :func:`eager_sae` undoes it.
    """
    import torch

    sae.run = torch.compile(sae.run)


def eager_sae(sae: Any) -> Any:
    """Undo :func:`compile_sae` (a no-op on an SAE that was not compiled); returns ``sae``."""
    vars(sae).pop("run", None)
    return sae


def build_run(
    recipe: RecipeConfig,
    *,
    version: int | str | None = None,
    log: bool = True,
    module_factory: ModuleFactory = build_module,
) -> Run:
    """Build DataModule, module, callbacks, logger and Trainer from ``recipe``.

    Args:
        recipe: a validated recipe.
        version: the logger version (a run folder to resume into); None: the next one.
        log: False for a run that writes nothing (``validate``): no logger, no checkpoints.
        module_factory: builds the LightningModule; the default trains ``model``, or every
            entry of ``variants`` at once.

    Raises:
        ConfigError: for any invalid plugin, parameter or cross-field combination.
    """
    check_model_parallel(recipe)
    resolved = resolved_recipe(recipe)
    pl.seed_everything(recipe.seed, workers=True, verbose=False)
    datamodule = registry.build("datamodules", recipe.data, field="data", seed=recipe.seed)
    width = datamodule.d_in if isinstance(datamodule, DeclaresWidth) else None
    module = module_factory(recipe, width)
    from sae_lightning.callbacks.monitoring import monitoring_callbacks

    callbacks: list[pl.Callback] = [
        checkpoint_callback(recipe),
        LearningRateMonitor(logging_interval="step"),
        ReferenceMetrics(),
        NonFiniteGuard(),
        LastValidation(),
        *monitoring_callbacks(),
    ]
    trainer_args = with_default_precision(
        model_parallel_arguments({**TRAINER_DEFAULTS, **recipe.trainer})
    )
    if trainer_args.get("enable_progress_bar", True):
        callbacks.append(LoggedMetricsBar())
    for i, spec in enumerate(recipe.callbacks):
        callbacks.append(registry.build("callbacks", spec, field=f"callbacks.{i}"))
    logger: TensorBoardLogger | bool = False
    if log:
        logger = TensorBoardLogger(
            recipe.output_dir, name=recipe.name, version=version, default_hp_metric=False
        )
    else:
        callbacks = [
            c for c in callbacks if not isinstance(c, ModelCheckpoint | LearningRateMonitor)
        ]
    if isinstance(trainer_args.get("val_check_interval"), int) and trainer_args["max_steps"] > 0:
        trainer_args["val_check_interval"] = min(
            trainer_args["val_check_interval"], trainer_args["max_steps"]
        )
    try:
        trainer = pl.Trainer(
            **trainer_args,
            logger=logger,
            callbacks=callbacks,
            plugins=[AtomicCheckpointIO()],
            enable_checkpointing=log,
            default_root_dir=recipe.output_dir,
        )
    except (ValueError, TypeError, MisconfigurationException) as err:
        raise ConfigError("trainer", str(err)) from None
    return Run(recipe, datamodule, module, trainer, resolved)


def preflight(run: Run) -> None:
    """Check the data before any training step: both loaders yield finite ``(batch, d_in)``.

    Raises:
        ConfigError: naming ``data`` when a loader is empty, has the wrong width or NaN/Inf.
    """
    name = run.data_name
    datamodule = run.datamodule
    tokens = run.trains.takes_token_batches
    # e2e: a ConfigError naming model.loss.mode unless the data has a language model
    run.trains.configure_data_module(datamodule)
    datamodule.setup("fit")
    for split, make in (
        ("train", datamodule.train_dataloader),
        ("validation", datamodule.val_dataloader),
    ):
        if tokens and split == "train":
            continue  # token ids for the LM, not (batch, d_in) activations
        batch = next(iter(make()), None)
        if batch is None:
            raise ConfigError("data", f"the '{name}' {split} set is empty", "provide data")
        x = as_tensor(batch)
        d_in = next(iter(run.trains.members().values())).sae.d_in
        try:
            BatchValidator(d_in, "fail", source=f"'{name}' {split} data")(x, 0)
        except BadBatchError as err:
            raise ConfigError("data", str(err)) from None


def find_last_checkpoint(recipe: RecipeConfig) -> tuple[Path, int]:
    """The newest ``last.ckpt`` of this recipe's runs, with its logger version."""
    root = Path(recipe.output_dir) / recipe.name
    found: list[tuple[int, Path]] = []
    for d in root.glob("version_*"):
        m = re.fullmatch(r"version_(\d+)", d.name)
        ckpt = d / "checkpoints" / "last.ckpt"  # a folder when sharded (model_parallel)
        if m and ckpt.exists():
            found.append((int(m.group(1)), ckpt))
    if not found:
        raise ConfigError(
            "--ckpt_path",
            f"'last' found no checkpoints/last.ckpt under {root}/version_*",
            "train the recipe first, or pass the path of a .ckpt file",
        )
    version, ckpt = max(found)
    return ckpt, version


def fit(recipe: RecipeConfig, ckpt_path: str | None = None) -> dict[str, float]:
    """Train ``recipe`` (resuming from ``ckpt_path`` or ``"last"``), then write the run outputs.

    Returns:
        The final metrics, also written to ``<run_dir>/metrics.json``.
    """
    version: int | None = None
    resolved: str | None = ckpt_path
    if ckpt_path == "last":
        path, version = find_last_checkpoint(recipe)
        resolved = str(path)
    elif ckpt_path is not None and not os.path.exists(ckpt_path):
        raise ConfigError(
            "--ckpt_path", f"file {ckpt_path!r} not found", "pass 'last' or a .ckpt path"
        )
    run = build_run(recipe, version=version)
    if resolved is not None:
        check_resume_shapes(run.module, resolved)
    preflight(run)
    run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=resolved)
    if run.trainer.interrupted:
        return {}
    return finish(run)


def finish(run: Run) -> dict[str, float]:
    """Validate once more (unless fit's last step was validated), fill TensorBoard's hparams
    tab with the recipe and the final metrics, then write ``metrics.json`` and export the SAE
    into the run folder.

    A multi-SAE run's ``metrics.json`` holds every SAE's metrics (``<name>/val/fvu``...); each
    SAE is exported to ``<run folder>/<name>/`` with its own ``metrics.json``, unprefixed.
    """
    saes = run.trains.members()  # under distribute_saes, this process's
    names = run.module.names if isinstance(run.module, MultiSAEModule) else tuple(saes)
    prefixes = tuple(f"{name}/" for name in names if name)
    train_metrics = {
        k: float(v)
        for k, v in run.trainer.callback_metrics.items()
        if k.startswith("train/") or (k.startswith(prefixes) and "/train/" in k)
    }
    recorded = next((c for c in run.trainer.callbacks if isinstance(c, LastValidation)), None)
    results = recorded.at(run.trainer.global_step) if recorded is not None else None
    if results is None:  # the last step was not validated during fit
        validated = run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)
        results = {k: float(v) for k, v in validated[0].items()}
    # A sharded SAE is gathered whole for export: a collective, so every rank takes part.
    exported = {name: member.gathered_sae() for name, member in saes.items()}
    metrics = {**train_metrics, **results}
    metrics["trainer/global_step"] = float(run.trainer.global_step)
    from sae_lightning.callbacks.dashboard import log_final_hparams

    log_final_hparams(run.trainer, run.resolved.model_dump(mode="json"), metrics)
    if isinstance(run.trainer.logger, TensorBoardLogger):
        run.trainer.logger.experiment.flush()  # readers see the final summaries at once
    # Rank 0's folder: another rank's logger may not know its version.
    run_dir = Path(run.trainer.strategy.broadcast(str(run.run_dir)))
    if run.trainer.is_global_zero:
        write_metrics(run_dir / METRICS_FILE, metrics)
    spread = isinstance(run.module, MultiSAEModule) and run.module.spread  # each exports its own
    if run.trainer.is_global_zero or spread:
        for name, member in saes.items():
            sae, extra = raw_input_sae(eager_sae(exported[name]), run.datamodule)
            folder = run_dir / name if name else run_dir
            export_sae(sae, folder, plugins=member.plugin_versions, **extra)
            if name:
                write_metrics(folder / METRICS_FILE, member_metrics(metrics, name))
    return metrics


def validate(recipe: RecipeConfig, ckpt_path: str | None) -> dict[str, float]:
    """Evaluate a checkpoint (``None``: the freshly initialised SAE) on the recipe's data."""
    resolved = ckpt_path
    if ckpt_path == "last":
        resolved = str(find_last_checkpoint(recipe)[0])
    run = build_run(recipe, log=False)
    results = run.trainer.validate(
        run.module, datamodule=run.datamodule, ckpt_path=resolved, verbose=False
    )
    return {k: float(v) for k, v in results[0].items()}


def fit_many(
    recipe: RecipeConfig,
    variants: dict[str, dict[str, Any]] | None = None,
    *,
    ckpt_path: str | None = None,
) -> dict[str, dict[str, float]]:
    """Train every variant of ``recipe`` at once on its data; export each SAE separately.

    The same as ``sae-lightning fit`` on a recipe with ``variants:`` (docs/multi-gpu.md): one
    run folder for all SAEs, one export folder per variant.

    Args:
        recipe: a validated recipe; its ``model`` is the base of every variant.
        variants: variant name -> partial ``model:`` mapping, e.g. ``{"sparsity": {"k": 8}}``;
            None: the recipe's own ``variants``.
        ckpt_path: ``"last"`` or a checkpoint of the same variants to resume from.

    Returns:
        ``{variant: {"val/fvu": ..., "train/loss": ...}}``.

    Raises:
        ConfigError: no variants, or one naming ``variants.<N>.<field>``.
    """
    if variants is not None:
        listed = [{"name": name, **(overrides or {})} for name, overrides in variants.items()]
        recipe = recipe.model_copy(update={"variants": listed})
    if not recipe.variants:
        raise ConfigError("variants", "is empty", "give at least one {name: ..., <overrides>}")
    names = list(variant_models(recipe))
    metrics = fit(recipe, ckpt_path)
    return {name: member_metrics(metrics, name) for name in names} if metrics else {}
