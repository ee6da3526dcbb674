"""Recipe fields of the language-model data modules (``lm_activations``, ``activation_cache``)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from sae_lightning.config import PluginConfig
from sae_lightning.data.normalization import NormalizeMode, OutlierAction
from sae_lightning.data.validation import NonFinitePolicy
from sae_lightning.lm.hooks import HookIO
from sae_lightning.lm.loading import DTypeName, LMSourceConfig
from sae_lightning.lm.text import DocumentSplit


class ActivationOptions(PluginConfig):
    """How activations become training batches (shared by the streaming and cached modes)."""

    batch_size: int = Field(4096, gt=0, description="activations per global batch")
    val_batch_size: int = Field(4096, gt=0, description="activations per validation batch")
    seed: int | None = Field(None, ge=0, description="data seed; default the recipe's seed")
    normalize: NormalizeMode = Field(
        "none",
        description="scale activations by one factor: unit (mean squared norm 1) or sqrt_d_in "
        "(mean norm sqrt(d_in), as SAELens); estimated on the first stats_tokens rows",
    )
    stats_tokens: int = Field(
        16384, gt=0, description="activations used to estimate the scale and median norm"
    )
    outlier_factor: float | None = Field(
        None, gt=0, description="treat rows with norm over this x the median norm as outliers"
    )
    outlier_action: OutlierAction = Field(
        "clip", description="clip outliers to the threshold norm, or drop them"
    )
    verify_checksums: bool = Field(
        True, description="check every cache shard's sha256 against the manifest at setup"
    )
    nonfinite: NonFinitePolicy = Field(
        "fail", description="rows with NaN/Inf: fail the run, or drop them and count them"
    )


class LMActivationsConfig(LMSourceConfig, ActivationOptions):
    """``lm_activations``: a causal LM, a corpus, hook points, and how to batch the result."""

    hook: str = Field(
        ...,
        description="module path(s) to read, globs allowed, comma-separated "
        "(e.g. model.layers.15 or transformer.h.*)",
    )
    io: HookIO = Field(
        "output", description="take each module's output (residual after a block) or its input"
    )
    text: list[str] = Field(
        ...,
        description="local .txt/.jsonl files, folders, globs, a saved `datasets` folder, "
        "builtin:python-docs or builtin:python-license",
    )
    text_field: str = Field("text", description="JSON key / dataset column with the text")
    context_length: int = Field(256, ge=2, description="tokens per packed context")
    prepend_bos: bool = Field(True, description="start every context with the BOS token")
    exclude_special_tokens: bool = Field(
        True, description="no activations from BOS/EOS/padding or other special tokens"
    )
    val_sequences: int = Field(
        16, ge=0, description="held-out contexts for validation and KL (from held-out documents)"
    )
    val_documents: int | None = Field(
        None,
        gt=0,
        description="documents held out (seeded choice); default: as many as val_sequences fill",
    )
    val_fraction: float | None = Field(
        None, gt=0, lt=1, description="fraction of the documents held out (seeded choice)"
    )
    eval_text: dict[str, list[str]] = Field(
        {},
        description="named evaluation corpora {name: sources}, each logged as val/<name>/... by "
        "the e2e_kl callback (FVU, KL, CE recovered)",
    )
    eval_sequences: int = Field(16, gt=0, description="contexts evaluated per eval_text corpus")
    max_sequences: int | None = Field(
        None, gt=0, description="use at most this many contexts of the corpus"
    )
    dtype: DTypeName = Field(
        "float32", description="dtype activations are stored in (cache) and rounded to (stream)"
    )
    buffer_size: int = Field(
        65536, gt=0, description="activations per mixing buffer (a multiple of batch_size)"
    )
    harvest_batch_size: int = Field(8, gt=0, description="contexts per LM forward pass")
    prefetch: bool = Field(True, description="harvest the next buffer while the SAE trains")
    cache_dir: str | None = Field(
        None, description="read activations from this cache (write it with sae-lightning cache)"
    )
    shard_tokens: int = Field(
        65536, gt=0, description="cache shard size in activations (whole contexts per shard)"
    )
    d_in: int | None = Field(
        None, gt=0, description="activation width; default the LM's hidden size"
    )
    token_batch_size: int = Field(
        8,
        gt=0,
        description="contexts per global training batch when the training loader yields "
        "token ids (model.loss.mode e2e or e2e_ds)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> LMActivationsConfig:
        if self.buffer_size % self.batch_size:
            raise ValueError(
                f"buffer_size={self.buffer_size} must be a multiple of batch_size={self.batch_size}"
            )
        if self.val_documents is not None and self.val_fraction is not None:
            raise ValueError("set at most one of val_documents and val_fraction")
        return self

    def document_split(self, seed: int) -> DocumentSplit:
        """How the corpus's documents are split into training and held-out ones."""
        return DocumentSplit(self.val_sequences, self.val_documents, self.val_fraction, seed)


def cache_expectations(config: LMActivationsConfig) -> dict[str, Any]:
    """Manifest fields a cache must have to serve this recipe: ``{field: expected value}``."""
    return {
        "model": config.model,
        "hook": config.hook,
        "io": config.io,
        "context_length": config.context_length,
        "prepend_bos": config.prepend_bos,
        "exclude_special_tokens": config.exclude_special_tokens,
        "dtype": config.dtype,
    }


class ActivationCacheConfig(ActivationOptions):
    """``activation_cache``: a cache written by ``sae-lightning cache``, checked at the door."""

    path: str = Field(..., description="cache folder (holding manifest.json)")
    model: str = Field(..., description="the model the cache must come from (as in its manifest)")
    hook: str = Field(..., description="the hook the cache must hold (as in its manifest)")
    device: str | None = Field(
        None, description="device of the LM when the KL callback loads it from the manifest"
    )
