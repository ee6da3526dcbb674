"""Recipe and plugin configuration models.

Configs validate, never act: no paths are created, nothing is logged or imported here. A recipe
names plugins (``sparsity: {name: topk, k: 32}``); each plugin's own ``Config`` model checks the
rest of its mapping when the registry builds it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sae_lightning.errors import ConfigError, did_you_mean


class PluginConfig(BaseModel):
    """Base of every plugin's parameters: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class StrictModel(BaseModel):
    """Base of the recipe's own sections: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _spec_shorthand(value: Any) -> Any:
    """Accept ``sparsity: topk`` as shorthand for ``sparsity: {name: topk}``."""
    return {"name": value} if isinstance(value, str) else value


PluginSpec = Annotated[dict[str, Any], BeforeValidator(_spec_shorthand)]
"""A plugin named in a recipe: ``{"name": <plugin name>, **parameters}`` (or just the name)."""


def split_spec(spec: PluginSpec, field: str) -> tuple[str, dict[str, Any]]:
    """Split ``{"name": n, **params}`` into ``(n, params)``, naming ``field`` on bad input."""
    if isinstance(spec, str):
        return spec, {}
    if not isinstance(spec, dict):
        raise ConfigError(
            field,
            f"expected a mapping with a 'name' key, got {type(spec).__name__} {spec!r}",
            "write it as {name: <plugin>, <param>: <value>}",
        )
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"{field}.name",
            f"missing or not a string (got {name!r})",
            "name an installed plugin; `sae-lightning plugins` lists them",
        )
    return name, {k: v for k, v in spec.items() if k != "name"}


def _field_path(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    """The YAML path of a pydantic error location, without union-branch tags like 'str'."""
    path: list[str] = []
    for part in loc:
        if model is not None:
            field = model.model_fields.get(str(part))
            if field is None:
                break
            path.append(str(part))
            ann = field.annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        elif isinstance(part, int):
            path.append(str(part))  # an index into a list or tuple
        else:
            break
    return path


def config_error_from_validation(
    err: ValidationError, prefix: str, model: type[BaseModel]
) -> ConfigError:
    """Turn pydantic's first error into a ConfigError naming the dotted YAML field."""
    first = err.errors()[0]
    parts = _field_path(model, tuple(first["loc"]))
    if first["type"] == "extra_forbidden":  # the unknown key itself is not a field
        parts = [*_field_path(model, tuple(first["loc"][:-1])), str(first["loc"][-1])]
    loc = ".".join(parts)
    field = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
    if first["type"] == "extra_forbidden":
        key = str(first["loc"][-1])
        valid = sorted(_model_at(model, first["loc"][:-1]).model_fields)
        return ConfigError(
            field,
            f"unknown key '{key}'{did_you_mean(key, valid)}",
            f"valid keys: {', '.join(valid) or '(none)'}",
        )
    if first["type"] == "missing":
        return ConfigError(field, "is required", f"add `{field.rsplit('.', 1)[-1]}: <value>`")
    message = str(first["msg"]).removeprefix("Value error, ")
    value = first.get("input")
    if first["type"] != "value_error" and not isinstance(value, dict):
        shown = repr(value)
        message += f", got {shown if len(shown) <= 80 else shown[:77] + '...'}"
    return ConfigError(field, message)


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    """The (nested) pydantic model that holds the field at ``loc``."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return model


def validate_model(model: type[BaseModel], data: Any, prefix: str) -> Any:
    """Validate ``data`` against ``model``; raise ConfigError naming the field on failure."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a mapping, got {type(data).__name__} {data!r}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise config_error_from_validation(err, prefix, model) from None


class OptimizerConfig(StrictModel):
    """Adam with a linear warm-up and an optional decay to ``min_lr_ratio * lr``."""

    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay (AdamW when > 0)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 over this many steps")
    decay: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="schedule after warm-up, reaching min_lr_ratio at max_steps"
    )
    decay_start: float = Field(
        0.0, ge=0, le=1, description="fraction of max_steps after which decay begins"
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of lr")
    fused: bool | None = Field(
        None, description="use torch's fused Adam; None picks it when the device supports it"
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError("each beta must be in [0, 1)")
        return betas


class LossConfig(StrictModel):
    """What the SAE is trained for, how reconstruction is scored, when a latent is dead."""

    mode: Literal["local", "e2e", "e2e_ds"] = Field(
        "local",
        description="local: reconstruct the activations; e2e: match the LM's next-token "
        "distribution with the SAE spliced in at the hook (KL(P_clean || P_sae) + sparsity, "
        "Braun et al. 2024); e2e_ds: e2e plus reconstruction of later layers' activations. "
        "The e2e modes need language-model data (lm_activations), which then yields token "
        "batches, and train through the frozen LM",
    )
    reconstruction: Literal["mse", "fvu", "rel_l2"] = Field(
        "mse",
        description="mse: mean over tokens of the squared L2 error; "
        "fvu: the same divided by the batch's total variance; "
        "rel_l2: mean over samples of ||u - u_hat||^2 / ||u||^2 (function data, quadrature)",
    )
    dead_window_tokens: int = Field(
        100_000,
        gt=0,
        description="a latent is dead when it has not fired in this many training tokens",
    )
    kl_coefficient: float | None = Field(
        None,
        ge=0,
        description="e2e modes: weight of the KL term; default 1.0 for e2e and 0.5 for e2e_ds "
        "(the paper's values)",
    )
    downstream_coefficient: float = Field(
        2.5,
        ge=0,
        description="e2e_ds: total weight (beta) of the downstream reconstruction terms, split "
        "evenly over the downstream hooks (paper: 2.5 at GPT-2 layers 2 and 6, 0.05 at 10)",
    )
    downstream_hooks: str | None = Field(
        None,
        description="e2e_ds: module paths (globs, comma-separated) whose activations must match "
        "the clean run; default every residual stream between the hook and the last block",
    )

    @model_validator(mode="after")
    def _e2e_fields_need_e2e(self) -> LossConfig:
        if self.downstream_hooks is not None and self.mode != "e2e_ds":
            raise ValueError(
                f"downstream_hooks is set but mode is {self.mode!r}: set mode: e2e_ds, "
                "or remove downstream_hooks"
            )
        if self.kl_coefficient is not None and self.mode == "local":
            raise ValueError(
                "kl_coefficient is set but mode is 'local': set mode: e2e or e2e_ds, "
                "or remove kl_coefficient"
            )
        return self

    @property
    def kl_weight(self) -> float:
        """The KL term's coefficient in the e2e modes (the paper's value when unset)."""
        if self.kl_coefficient is not None:
            return self.kl_coefficient
        return 0.5 if self.mode == "e2e_ds" else 1.0


class ModelConfig(StrictModel):
    """The SAE: its width and the three plugins it composes."""

    d_in: int | None = Field(
        None, gt=0, description="input width; taken from the data when omitted"
    )
    d_sae: int | None = Field(None, gt=0, description="number of latents (dictionary size)")
    expansion_factor: float | None = Field(
        None, gt=0, description="d_sae as a multiple of d_in, when d_sae is omitted"
    )
    encoder: PluginSpec = Field(default_factory=lambda: {"name": "linear"})
    decoder: PluginSpec = Field(default_factory=lambda: {"name": "linear"})
    sparsity: PluginSpec = Field(default_factory=lambda: {"name": "topk"})
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    compile: bool = Field(
        False,
        description="compile the SAE's forward with torch.compile (needs a C++ compiler on "
        "CPU, Triton on GPU); the first steps are slower while it compiles",
    )

    @model_validator(mode="after")
    def _one_width(self) -> ModelConfig:
        if self.d_sae is not None and self.expansion_factor is not None:
            raise ValueError(
                "give either d_sae or expansion_factor, not both "
                f"(got d_sae={self.d_sae}, expansion_factor={self.expansion_factor})"
            )
        return self


class CheckpointConfig(StrictModel):
    """When Lightning checkpoints are written (always also ``last.ckpt``)."""

    every_n_steps: int = Field(500, gt=0, description="save a checkpoint every this many steps")
    keep: int = Field(1, ge=-1, description="how many periodic checkpoints to keep (-1: all)")


class RecipeConfig(StrictModel):
    """A whole training run, as written in ``recipes/*.yaml``."""

    name: str = Field(
        ..., pattern=r"^[A-Za-z0-9_.\-]+$", description="run name; logs go to <output_dir>/<name>/"
    )
    seed: int = Field(0, ge=0, description="seed for weights and data")
    output_dir: str = Field("runs", description="root folder of TensorBoard logs and run outputs")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: PluginSpec = Field(default_factory=lambda: {"name": "synthetic"})
    trainer: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of lightning.Trainer"
    )
    callbacks: list[PluginSpec] = Field(
        default_factory=list, description="callback plugins, each {name: ..., <params>}"
    )
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    variants: list[dict[str, Any]] = Field(
        default_factory=list,
        description="several SAEs trained at once on one stream: each {name: ..., <model "
        "overrides>} is merged onto `model` (docs/multi-gpu.md); empty: just `model`",
    )
