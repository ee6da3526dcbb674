"""Loading a causal LM and its tokenizer from a local folder, a hub id or a GGUF file.

The model's width is read from its ``config.json`` (or the GGUF header) without loading any
weights, so a recipe can be validated and built on a machine that cannot run the model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from sae_lightning.config import PluginConfig
from sae_lightning.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

DTypeName = Literal["float32", "bfloat16", "float16", "float64"]
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
WIDTH_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
"""Names ``config.json`` files use for the residual width."""

PREPARE_HINTS = {"smollm2-135m": "sae-lightning models prepare smollm2"}
"""Folder name of a prepared model -> the command that creates it."""


class LMSourceConfig(PluginConfig):
    """Where the language model comes from (shared by the DataModules and the KL callback)."""

    model: str = Field(
        ...,
        description="local model folder (~ expanded), or a hub id such as "
        "HuggingFaceTB/SmolLM2-135M when online",
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    gguf_file: str | None = Field(
        None, description="GGUF file name inside `model` to load (dequantized by transformers)"
    )
    model_dtype: DTypeName = Field("float32", description="dtype the LM runs in")
    device: str | None = Field(
        None, description="device of the LM; default the Trainer's device (cpu without one)"
    )


def local_path(model: str) -> Path | None:
    """The local folder ``model`` names, or None when it is a hub id.

    Raises:
        ConfigError: ``model`` looks like a path (starts with ``/``, ``~`` or ``.``) but does not
            exist; the message names the prepare command when one creates it.
    """
    path = Path(model).expanduser()
    if path.exists():
        return path
    if model.startswith(("/", "~", ".")):
        hint = PREPARE_HINTS.get(path.name)
        fix = f"run `{hint}` first" if hint else "point data.model at a model folder"
        raise ConfigError("data.model", f"folder {str(path)!r} does not exist", fix)
    return None


def hidden_size(source: LMSourceConfig) -> int:
    """The LM's residual width from its config, without loading weights.

    Raises:
        ConfigError: the config cannot be found or names no width.
    """
    path = local_path(source.model)
    if path is not None and source.gguf_file is not None:
        return _gguf_width(path / source.gguf_file)
    if path is not None:
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(
                "data.model", f"{path} has no config.json", "set data.gguf_file for a GGUF model"
            )
        config = json.loads(cfg_file.read_text())
    else:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(source.model, revision=source.revision).to_dict()
        except OSError as err:
            raise ConfigError("data.model", f"cannot fetch {source.model!r}: {err}") from None
    for key in WIDTH_KEYS:
        if isinstance(config.get(key), int):
            return int(config[key])
    text = config.get("text_config") or {}
    for key in WIDTH_KEYS:
        if isinstance(text.get(key), int):
            return int(text[key])
    raise ConfigError(
        "data.model", f"its config has none of {WIDTH_KEYS}", "set data.d_in explicitly"
    )


def _gguf_width(path: Path) -> int:
    if not path.is_file():
        raise ConfigError("data.gguf_file", f"{str(path)!r} does not exist")
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch_field = reader.fields["general.architecture"]
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
    field = reader.fields.get(f"{arch}.embedding_length")
    if field is None:
        raise ConfigError("data.gguf_file", f"{path} has no {arch}.embedding_length")
    return int(field.parts[field.data[0]][0])


def quiet_transformers() -> None:
    """No progress bars or advisory warnings from transformers on our terminal."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def _where(source: LMSourceConfig) -> tuple[str, dict[str, Any]]:
    path = local_path(source.model)
    kwargs: dict[str, Any] = {}
    if source.gguf_file is not None:
        kwargs["gguf_file"] = source.gguf_file
    if path is None:
        kwargs["revision"] = source.revision
    return (str(path) if path is not None else source.model), kwargs


def load_tokenizer(source: LMSourceConfig) -> Any:
    """The tokenizer of ``source`` (a ``transformers`` fast tokenizer)."""
    quiet_transformers()
    from transformers import AutoTokenizer

    where, kwargs = _where(source)
    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError("data.model", f"cannot load a tokenizer from {where!r}: {err}") from None


def load_model(source: LMSourceConfig, device: str | torch.device = "cpu") -> nn.Module:
    """The causal LM of ``source`` in eval mode, frozen, on ``device``."""
    quiet_transformers()
    from transformers import AutoModelForCausalLM

    where, kwargs = _where(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, **kwargs, **_dtype_kwarg(DTYPES[source.model_dtype])
        )
    except (OSError, ValueError) as err:
        raise ConfigError("data.model", f"cannot load a model from {where!r}: {err}") from None
    model.to(device).eval()
    model.requires_grad_(False)
    return model
