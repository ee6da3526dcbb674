"""Several SAEs trained in one pass over one stream, each exactly as it would train alone.

:class:`MultiSAEModule` holds one :class:`~sae_lightning.module.SAEModule` per variant (e.g.
several sparsity settings) and feeds each the same batch. Their losses are summed, but no
parameter is shared, so each SAE's gradient is the gradient of its own loss; one Adam
optimizer holds one parameter group and one lr schedule per SAE, and Adam is elementwise, so
each SAE follows the trajectory it follows alone with the same seed and data. Metrics are
logged under ``<name>/`` (``topk_k8/train/loss``) and each SAE is exported to its own folder.

Under DDP every rank holds every SAE and a slice of the batch (docs/multi-gpu.md explains why
that is the default rather than spreading SAEs over devices).

A recipe asks for it with ``variants:``, a list of ``model:`` overrides (docs/multi-gpu.md)::

    variants:
      - {name: topk_k4, sparsity: {k: 4}}
      - {name: topk_k8, sparsity: {k: 8}}

and the runner builds this module instead of a single :class:`SAEModule`; from Python,
:func:`fit_many` does the same with a ``{name: overrides}`` mapping.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from sae_lightning.config import RecipeConfig
from sae_lightning.errors import ConfigError
from sae_lightning.io import export_sae
from sae_lightning.module import (
    CHECKPOINT_KEY,
    SAEModule,
    as_tensor,
    build_optimizer,
    terminate_ranks_on_error,
)
from sae_lightning.recipe import SAE_NAME, variant_models
from sae_lightning.runner import compile_sae, fit, member_metrics, resolve_widths


class MultiSAEModule(pl.LightningModule):
    """Trains several SAEs on the same batches; each logs under ``<name>/`` and exports alone.

    Args:
        saes: name -> :class:`~sae_lightning.module.SAEModule` keyword arguments (``d_in``,
            ``d_sae``, ``encoder``, ``decoder``, ``sparsity``, ``optimizer``, ``loss``). Names
            become log prefixes and export folders, so they use letters, digits, ``_.-``.
        seed: when set, each SAE is initialised right after ``torch.manual_seed(seed)``, as a
            run of that SAE alone seeded with ``seed`` is; None draws them one after another.

    Raises:
        ConfigError: no SAE, a bad name, different input widths, or a bad SAE argument
            (reported under ``saes.<name>``).
    """

    def __init__(self, saes: dict[str, dict[str, Any]], seed: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not saes:
            raise ConfigError("saes", "is empty", "give at least one {name: SAEModule kwargs}")
        members: dict[str, SAEModule] = {}
        for name, kwargs in saes.items():
            _check_name(name)
            try:
                if seed is None:
                    members[name] = SAEModule(**kwargs)
                else:
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seed)
                        members[name] = SAEModule(**kwargs)
            except ConfigError as err:
                raise err.under(f"saes.{name}") from None
        widths = {name: m.sae.d_in for name, m in members.items()}
        if len(set(widths.values())) > 1:
            raise ConfigError(
                "saes",
                f"SAEs trained on one stream need one input width, got {widths}",
                "give every SAE the d_in of the data",
            )
        self.saes = nn.ModuleDict(members)

    def members(self) -> dict[str, SAEModule]:
        """The SAEs, by name."""
        return dict(self.saes.items())

    # ---- training -------------------------------------------------------------------------

    def training_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int) -> dict[str, Any]:
        x = as_tensor(batch)
        losses, terms = [], {}
        for name, member in self.saes.items():
            out = member.compute_step(x, step=self.global_step)
            for key, value in out.metrics.items():
                self.log(f"{name}/{key}", value)
            losses.append(out.loss)
            terms.update({f"{name}/{k}": v.detach() for k, v in out.terms.items()})
        loss = torch.stack(losses).sum()
        self.log("train/loss_sum", loss.detach(), prog_bar=True)
        return {"loss": loss, "terms": terms}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for member in self.saes.values():
            member.sae.before_optimizer_step()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        for member in self.saes.values():
            member.sae.after_optimizer_step()

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip each SAE's gradients on their own, so SAEs never scale each other's steps."""
        if gradient_clip_val is None:
            return
        for member in self.saes.values():
            params = [p for p in member.parameters() if p.grad is not None]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def configure_optimizers(self) -> dict[str, Any]:
        groups = [
            ([p for p in m.parameters() if p.requires_grad], m.optimizer_config)
            for m in self.saes.values()
        ]
        return build_optimizer(groups, self.trainer)

    def configure_callbacks(self) -> list[pl.Callback]:
        return terminate_ranks_on_error(self.trainer)

    # ---- evaluation -----------------------------------------------------------------------

    def validation_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int) -> None:
        x = as_tensor(batch)
        for member in self.saes.values():
            member.update_validation(x, step=self.global_step)

    def on_validation_epoch_end(self) -> None:
        for name, member in self.saes.items():
            results, density = member.validation_results()
            for key, value in results.items():
                self.log(f"{name}/{key}", value, sync_dist=True)  # equal on all ranks
            if isinstance(self.logger, TensorBoardLogger) and self.trainer.is_global_zero:
                self.logger.experiment.add_histogram(
                    f"{name}/val/feature_density_log10",
                    torch.log10(density.clamp_min(1e-10)).cpu(),
                    self.global_step,
                )

    # ---- checkpoints and export -----------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from sae_lightning._version import __version__

        checkpoint[CHECKPOINT_KEY] = {
            "version": __version__,
            "plugins": {name: m.plugin_versions for name, m in self.saes.items()},
        }

    def export(self, directory: str | Path) -> dict[str, Path]:
        """Export each SAE to ``<directory>/<name>/`` (loadable with ``load_sae``)."""
        return {
            name: export_sae(m.sae, Path(directory) / name, plugins=m.plugin_versions)
            for name, m in self.saes.items()
        }


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not SAE_NAME.match(name):
        raise ConfigError(
            f"saes.{name}",
            "is not a valid SAE name",
            "use letters, digits, '_', '.' and '-' (it becomes a log prefix and a folder)",
        )


def build_multi_module(recipe: RecipeConfig, data_d_in: int | None) -> MultiSAEModule:
    """A :class:`MultiSAEModule` of the recipe's ``variants`` (the runner's module factory for
    recipes that list them); each variant is compiled when its ``compile`` is set.

    Raises:
        ConfigError: naming ``variants.<N>.<field>``.
    """
    models = variant_models(recipe)
    index = {name: i for i, name in enumerate(models)}
    saes = {}
    for name, model in models.items():
        try:
            d_in, d_sae = resolve_widths(recipe.model_copy(update={"model": model}), data_d_in)
        except ConfigError as err:  # model.<field> -> variants.<N>.<field>
            raise _under_variant(err, index[name]) from None
        saes[name] = {
            "d_in": d_in,
            "d_sae": d_sae,
            "encoder": model.encoder,
            "decoder": model.decoder,
            "sparsity": model.sparsity,
            "optimizer": model.optimizer.model_dump(),
            "loss": model.loss.model_dump(),
        }
    try:
        module = MultiSAEModule(saes, seed=recipe.seed)
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


def fit_many(
    recipe: RecipeConfig,
    variants: dict[str, dict[str, Any]] | None = None,
    *,
    ckpt_path: str | None = None,
) -> dict[str, dict[str, float]]:
    """Train every variant of ``recipe`` at once on its data; export each SAE separately.

    The same as ``sae-lightning fit`` on a recipe with ``variants:``: the run folder
    ``<output_dir>/<name>/version_N/`` holds the TensorBoard events, the checkpoints and
    ``metrics.json`` of all SAEs (keys ``<variant>/val/fvu``...), and one folder per variant
    with its ``sae.safetensors``, ``sae_config.json`` and ``metrics.json``. The recipe's
    ``trainer:`` and ``callbacks:`` (e.g. the resampler) apply to all SAEs.

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
