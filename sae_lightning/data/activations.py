"""Activations of a ``transformers`` causal LM, harvested on the fly or read from a cache.

``lm_activations`` runs the LM over a local text corpus, packed into fixed-length contexts, and
delivers the activations at one or more hook points (module paths, globs allowed). With several
hooks every token gives one row per hook, so one SAE learns all of them (a multi-layer SAE).

Streaming (``cache_dir`` unset): the infinite stream of activations visits the training
contexts in a new seeded order each epoch. It is cut into mixing buffers of ``buffer_size``
rows; each buffer is harvested (the next one in a background thread while the SAE trains),
shuffled at token level and sliced into batches. Which contexts a buffer holds follows from the
token ids alone, so batch ``t`` is a pure function of ``(seed, t)``: a run resumed at step
``t`` recomputes its buffer and sees exactly the batches an unbroken run would, and DDP ranks
take their slices of one global batch (each rank runs the LM over the whole buffer).

Cached (``cache_dir`` set, written by ``sae-lightning cache``): see
:mod:`sae_lightning.data.cache`; each epoch is a seeded token-level permutation of the whole
cache and each rank reads only its own rows.

Token batches (e2e training, ``model.loss.mode: e2e``; see :mod:`sae_lightning.lm.e2e_module`):
the training loader yields token batches (:class:`TokenBatch`) of ``token_batch_size`` whole
contexts instead of activations, visiting the contexts in the same seeded per-epoch order as
the streaming mode, so a local run and an e2e run over the same number of tokens see the same
contexts. Batch ``t`` is a pure function of ``(seed, t)`` and DDP ranks take their slices of
it; validation still yields held-out activations (FVU, L0).
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import lightning.pytorch as pl
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from sae_lightning.config import PluginConfig
from sae_lightning.data.normalization import (
    ActivationTransform,
    NormalizeMode,
    NormStats,
    OutlierAction,
    norm_stats,
    scale_factor,
)
from sae_lightning.data.stream import ConsumedBatches, seeded_generator
from sae_lightning.data.validation import BatchValidator, NonFinitePolicy
from sae_lightning.errors import ConfigError
from sae_lightning.lm.hooks import HookIO
from sae_lightning.lm.loading import DTYPES, DTypeName, LMSourceConfig, hidden_size

if TYPE_CHECKING:
    from sae_lightning.data.cache import ActivationCache
    from sae_lightning.data.text import Contexts, TokenizedCorpus
    from sae_lightning.lm.harvest import Harvester

_ORDER, _BUFFER = 10, 11  # stream ids for seeded_generator


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
        "or builtin:python-docs",
    )
    text_field: str = Field("text", description="JSON key / dataset column with the text")
    context_length: int = Field(256, ge=2, description="tokens per packed context")
    prepend_bos: bool = Field(True, description="start every context with the BOS token")
    exclude_special_tokens: bool = Field(
        True, description="no activations from BOS/EOS/padding or other special tokens"
    )
    val_sequences: int = Field(16, ge=0, description="contexts held out for validation and KL")
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
    def _buffer_holds_batches(self) -> LMActivationsConfig:
        if self.buffer_size % self.batch_size:
            raise ValueError(
                f"buffer_size={self.buffer_size} must be a multiple of batch_size={self.batch_size}"
            )
        return self


@dataclass
class LMHandle:
    """What the KL callback needs: the LM, where the SAE goes, and held-out tokens."""

    model: nn.Module
    hooks: list[str]
    io: HookIO
    scale: float
    heldout_ids: Tensor
    """``(n, context_length)`` token ids never trained on."""
    heldout_keep: Tensor
    """``(n, context_length)`` bool: positions the SAE is trained for (others stay clean)."""


class TokenBatch(NamedTuple):
    """Whole contexts for e2e training (this rank's part of one global batch)."""

    ids: Tensor
    """``(contexts, context_length)`` int64 token ids."""
    keep: Tensor
    """``(contexts, context_length)`` bool: positions the SAE replaces (others stay clean)."""


class TokenStream:
    """Global batches of whole contexts: batch ``t`` depends only on ``(seed, t)``.

    Stream position ``p`` is context ``order_e[p mod n]`` of epoch ``e = p // n``, with the same
    seeded per-epoch orders as :class:`MixingStream`.

    Args:
        contexts: the training contexts.
        batch_size: contexts per global batch.
        seed: data seed.
    """

    def __init__(self, contexts: Contexts, batch_size: int, seed: int) -> None:
        if len(contexts) == 0:
            raise ConfigError("data.text", "the corpus packs into no training context")
        self.contexts = contexts
        self.batch_size = batch_size
        self.seed = seed
        self._orders: dict[int, Tensor] = {}

    def _order(self, epoch: int) -> Tensor:
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
            g = seeded_generator(self.seed, _ORDER, epoch)
            self._orders[epoch] = torch.randperm(len(self.contexts), generator=g)
        return self._orders[epoch]

    def rows(self, t: int) -> Tensor:
        """``(batch_size,)`` context indices of global batch ``t``."""
        n = len(self.contexts)
        positions = torch.arange(t * self.batch_size, (t + 1) * self.batch_size)
        epochs, offsets = positions // n, positions % n
        return torch.stack(
            [self._order(int(e))[int(o)] for e, o in zip(epochs, offsets, strict=True)]
        )

    def batch(self, t: int) -> TokenBatch:
        rows = self.rows(t)
        return TokenBatch(self.contexts.ids[rows], self.contexts.keep[rows])


class BatchStream(IterableDataset):
    """Yields ``batch_fn(start), batch_fn(start + 1), ...`` (already this rank's part)."""

    def __init__(self, batch_fn: Callable[[int], Any], start: int) -> None:
        super().__init__()
        self.batch_fn = batch_fn
        self.start = start

    def __iter__(self) -> Iterator[Any]:
        t = self.start
        while True:
            yield self.batch_fn(t)
            t += 1


class MixingStream:
    """The streaming mode's batches: buffers of harvested rows, shuffled, cut into batches.

    Args:
        contexts: the training contexts.
        harvest: ``rows -> (kept rows x hooks, d)`` activations of those contexts, in order.
        rows_per_position: hooks per kept position.
        buffer_size: rows per mixing buffer (a multiple of ``batch_size``).
        batch_size: rows per global batch.
        seed: data seed.
        prefetch: compute buffer ``j + 1`` in a background thread.
    """

    def __init__(
        self,
        contexts: Contexts,
        harvest: Callable[[Tensor], Tensor],
        rows_per_position: int,
        buffer_size: int,
        batch_size: int,
        seed: int,
        prefetch: bool = True,
    ) -> None:
        self.harvest = harvest
        self.counts = contexts.row_counts() * rows_per_position  # (n,) rows per context
        self.per_epoch = int(self.counts.sum())
        if self.per_epoch == 0:
            raise ConfigError("data.text", "no token survives the exclusions")
        self.buffer_size = buffer_size
        self.batch_size = batch_size
        self.seed = seed
        self._orders: dict[int, tuple[Tensor, Tensor]] = {}
        self._orders_lock = threading.Lock()  # the prefetch thread computes orders too
        self._buffers: dict[int, Tensor] = {}
        self._pending: dict[int, concurrent.futures.Future[Tensor]] = {}
        self.prefetch = prefetch
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _order(self, epoch: int) -> tuple[Tensor, Tensor]:
        """``(context order, cumulative row counts in that order)`` of ``epoch``."""
        with self._orders_lock:
            if epoch not in self._orders:
                if len(self._orders) > 2:
                    self._orders.pop(min(self._orders))
                g = seeded_generator(self.seed, _ORDER, epoch)
                order = torch.randperm(len(self.counts), generator=g)
                self._orders[epoch] = (order, self.counts[order].cumsum(0))
            return self._orders[epoch]

    def buffer(self, j: int) -> Tensor:
        """Mixing buffer ``j``: stream rows ``[j W, (j + 1) W)``, shuffled, ``(W, d)``.

        Stream position ``p`` is row ``p mod T`` of epoch ``p // T`` (``T`` rows per epoch), the
        epoch visiting contexts in its own seeded order.
        """
        pieces = []
        position, stop = j * self.buffer_size, (j + 1) * self.buffer_size
        while position < stop:
            epoch, offset = divmod(position, self.per_epoch)
            end = min(self.per_epoch, offset + stop - position)
            order, cum = self._order(epoch)
            first = int(torch.searchsorted(cum, offset, right=True))
            last = int(torch.searchsorted(cum, end - 1, right=True))
            base = int(cum[first] - self.counts[order[first]])
            rows = self.harvest(order[first : last + 1])[offset - base : end - base]
            # Shuffle each epoch's part on its own, so stream positions [e T, (e + 1) T) hold
            # exactly epoch e's rows even when a buffer straddles two epochs.
            g = seeded_generator(self.seed, _BUFFER, j, len(pieces))
            pieces.append(rows[torch.randperm(len(rows), generator=g)])
            position += end - offset
        return torch.cat(pieces)

    def _get(self, j: int) -> Tensor:
        if j not in self._buffers:
            future = self._pending.pop(j, None)
            self._buffers[j] = future.result() if future is not None else self.buffer(j)
            for old in [k for k in self._buffers if k < j]:
                del self._buffers[old]
            if self.prefetch and j + 1 not in self._pending:
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(1, "harvest")
                self._pending[j + 1] = self._pool.submit(self._harvest_in_thread, j + 1)
        return self._buffers[j]

    def _harvest_in_thread(self, j: int) -> Tensor:
        with torch.no_grad():
            return self.buffer(j)

    def batch(self, t: int) -> Tensor:
        """Global batch ``t``: identical for the same seed and ``t``, whatever ran before."""
        per_buffer = self.buffer_size // self.batch_size
        j, i = divmod(t, per_buffer)
        return self._get(j)[i * self.batch_size : (i + 1) * self.batch_size]

    def close(self) -> None:
        """Stop the prefetch thread (a later batch starts a new one)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()
        self._buffers.clear()


class _ActivationData(pl.LightningDataModule):
    """Shared by both plugins: batching, transforms, validation at the door, position state."""

    config: ActivationOptions

    def __init__(self, config: ActivationOptions, seed: int) -> None:
        super().__init__()
        self.config = config
        self.seed = config.seed if config.seed is not None else seed
        self.consumed = ConsumedBatches()
        self.validator: BatchValidator | None = None
        self.stats: NormStats | None = None
        self.transform: ActivationTransform | None = None
        self._val: Tensor | None = None

    @property
    def d_in(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def scale(self) -> float:
        """The factor activations are multiplied by (1.0 until setup, or without normalize)."""
        return self.transform.scale if self.transform is not None else 1.0

    def _set_stats(self, stats: NormStats) -> None:
        c = self.config
        self.stats = stats
        max_norm = None if c.outlier_factor is None else c.outlier_factor * stats.median_norm
        self.transform = ActivationTransform(
            scale_factor(stats, c.normalize, self.d_in), max_norm, c.outlier_action
        )
        self.validator = BatchValidator(self.d_in, c.nonfinite, source=self._source_name())

    def _source_name(self) -> str:
        return type(self).__name__

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        # the data-parallel rank under model_parallel
        sampler = getattr(self.trainer, "distributed_sampler_kwargs", None)
        if sampler is not None:
            return sampler["rank"], sampler["num_replicas"]
        return self.trainer.global_rank, self.trainer.world_size

    def _check_divisible(self) -> None:
        world = self._rank()[1]
        if self.config.batch_size % world:
            raise ConfigError(
                "data.batch_size",
                f"{self.config.batch_size} is not divisible by the {world} ranks",
                "use a multiple of the number of devices",
            )

    def rank_batch(self, t: int) -> Tensor:  # pragma: no cover - overridden
        """This rank's part of global batch ``t``, transformed."""
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return DataLoader(BatchStream(self.rank_batch, self.consumed.count), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        assert self._val is not None, "call setup() first"
        rank, world = self._rank()
        return DataLoader(
            TensorDataset(self._val[rank::world]), batch_size=self.config.val_batch_size
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training and self.validator is not None:
            self.consumed.count += 1
            return self.validator(batch, self.consumed.count - 1)
        return batch

    def state_dict(self) -> dict[str, Any]:
        state = {**self.consumed.state_dict(), "scale": self.scale}
        if self.validator is not None:
            state.update(self.validator.state_dict())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consumed.load_state_dict(state_dict)
        self._resumed_state = dict(state_dict)
        self._restore_validator()

    def _restore_validator(self) -> None:
        """Apply checkpointed state (dropped-row count, scale) once setup has built the parts.

        The scale is recomputed identically from the same rows, but taking the saved value
        keeps a resumed run exact even where float rounding differs (another thread count).
        """
        state = getattr(self, "_resumed_state", None)
        if state is None:
            return
        if self.validator is not None:
            self.validator.load_state_dict(state)
        if self.transform is not None and "scale" in state:
            self.transform.scale = float(state["scale"])

    def language_model(self) -> LMHandle:  # pragma: no cover - overridden
        """The LM, the hook and held-out tokens, for :class:`E2EKLEvaluation`."""
        raise NotImplementedError


class ActivationDataModule(_ActivationData):
    """Activations of a transformers causal LM at named hook points, streamed or cached."""

    Config = LMActivationsConfig
    config: LMActivationsConfig

    def __init__(self, config: LMActivationsConfig, *, seed: int = 0) -> None:
        super().__init__(config, seed)
        # Read the width now (cheap: config.json or the GGUF header), load the LM in setup().
        self._d_in = config.d_in if config.d_in is not None else hidden_size(config)
        self.model: nn.Module | None = None
        self.hooks: list[str] = []
        self.corpus: TokenizedCorpus | None = None
        self.harvester: Harvester | None = None
        self.stream: MixingStream | None = None
        self.cache: ActivationCache | None = None
        self.token_batches = False
        """True once :meth:`use_token_batches` switched training to token batches."""
        self.tokens: TokenStream | None = None

    @property
    def d_in(self) -> int:
        """Width of every activation; the recipe's ``model.d_in`` must match it."""
        return self._d_in

    def use_token_batches(self) -> None:
        """Train on token batches (:class:`TokenBatch`) of ``token_batch_size`` contexts (e2e).

        Call before the training loader is made; validation keeps yielding activations.
        """
        self.token_batches = True

    def _source_name(self) -> str:
        return f"activations of {self.config.model} at {self.config.hook}"

    def lm_device(self) -> torch.device:
        if self.config.device is not None:
            return torch.device(self.config.device)
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cpu")

    def load(self) -> None:
        """Load the tokenizer, the corpus, the LM and the hooks (idempotent)."""
        if self.model is not None:
            return
        from sae_lightning.data.text import read_documents, tokenize_corpus
        from sae_lightning.lm.harvest import Harvester
        from sae_lightning.lm.hooks import hook_width, resolve_hooks
        from sae_lightning.lm.loading import load_model, load_tokenizer

        c = self.config
        tokenizer = load_tokenizer(c)
        self.corpus = tokenize_corpus(
            read_documents(c.text, c.text_field),
            tokenizer,
            context_length=c.context_length,
            prepend_bos=c.prepend_bos,
            exclude_special_tokens=c.exclude_special_tokens,
            val_sequences=c.val_sequences,
            max_sequences=c.max_sequences,
        )
        model = load_model(c, self.lm_device())
        self.hooks = resolve_hooks(model, c.hook)
        for hook in self.hooks:
            width = hook_width(model, hook, c.io)
            if width != self.d_in:
                raise ConfigError(
                    "data.d_in" if c.d_in is not None else "data.hook",
                    f"the {c.io} of {hook} has width {width}, but d_in is {self.d_in}",
                    f"set data.d_in: {width}, or hook a residual-stream module",
                )
        self.model = model
        self.harvester = Harvester(model, self.hooks, c.io, DTYPES[c.dtype], c.harvest_batch_size)

    def setup(self, stage: str | None = None) -> None:
        self._check_divisible()
        if self.transform is not None:
            return
        c = self.config
        if c.cache_dir is not None:
            self._setup_cached()
            return
        self.load()
        assert self.corpus is not None and self.harvester is not None
        train = self.corpus.train
        self._set_stats(norm_stats(first_rows(train, self.harvester, c.stats_tokens)))
        self._restore_validator()
        self.stream = MixingStream(
            train,
            lambda rows: self.harvester(train, rows),  # type: ignore[misc]
            len(self.hooks),
            c.buffer_size,
            c.batch_size,
            self.seed,
            c.prefetch,
        )
        assert self.transform is not None
        self._val = self.transform(self.harvester(self.corpus.val))

    def _setup_cached(self) -> None:
        from sae_lightning.data.cache import open_cache

        c = self.config
        assert c.cache_dir is not None
        self.cache = open_cache(
            Path(c.cache_dir).expanduser(),
            expect=cache_expectations(c),
            verify=c.verify_checksums,
            field="data.cache_dir",
        )
        if self.cache.d_in != self.d_in:
            raise ConfigError(
                "data.d_in", f"is {self.d_in} but the cache holds width {self.cache.d_in}"
            )
        self._set_stats(self.cache.stats_for(c.stats_tokens))
        self._restore_validator()
        assert self.transform is not None
        self._val = self.transform(self.cache.val_rows())

    def _check_divisible(self) -> None:
        super()._check_divisible()
        world = self._rank()[1]
        if self.token_batches and self.config.token_batch_size % world:
            raise ConfigError(
                "data.token_batch_size",
                f"{self.config.token_batch_size} is not divisible by the {world} ranks",
                "use a multiple of the number of devices",
            )

    def train_dataloader(self) -> DataLoader:
        if not self.token_batches:
            return super().train_dataloader()
        self._check_divisible()
        if self.tokens is None:
            self.load()
            assert self.corpus is not None
            self.tokens = TokenStream(self.corpus.train, self.config.token_batch_size, self.seed)
        return DataLoader(BatchStream(self.rank_tokens, self.consumed.count), batch_size=None)

    def rank_tokens(self, t: int) -> TokenBatch:
        """This rank's contexts of global token batch ``t``."""
        assert self.tokens is not None, "call train_dataloader() first"
        rank, world = self._rank()
        per_rank = self.config.token_batch_size // world
        ids, keep = self.tokens.batch(t)
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        return TokenBatch(ids[part], keep[part])

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, TokenBatch):
            if self.trainer is not None and self.trainer.training:
                self.consumed.count += 1  # the position is all the state token batches need
            return batch
        return super().on_before_batch_transfer(batch, dataloader_idx)

    def rank_batch(self, t: int) -> Tensor:
        assert self.transform is not None
        rank, world = self._rank()
        per_rank = self.config.batch_size // world
        if self.cache is not None:
            rows = self.cache.batch_positions(t, self.config.batch_size, self.seed)
            rows = rows[rank * per_rank : (rank + 1) * per_rank]
            return self.transform(self.cache.read(rows))
        assert self.stream is not None
        batch = self.stream.batch(t)
        return self.transform(batch[rank * per_rank : (rank + 1) * per_rank])

    def teardown(self, stage: str | None = None) -> None:
        if self.stream is not None:
            self.stream.close()

    def language_model(self) -> LMHandle:
        self.load()
        assert self.model is not None and self.corpus is not None
        val = self.corpus.val
        return LMHandle(self.model, self.hooks, self.config.io, self.scale, val.ids, val.keep)


def first_rows(contexts: Contexts, harvester: Harvester, n: int) -> Tensor:
    """The first ``n`` activation rows of ``contexts`` in their canonical order."""
    counts = contexts.row_counts() * len(harvester.hooks)
    needed = int(torch.searchsorted(counts.cumsum(0), n)) + 1
    return harvester(contexts, torch.arange(min(needed, len(contexts))))[:n]


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


class ActivationCacheDataModule(_ActivationData):
    """Activations read from a sharded safetensors cache, shuffled at token level per epoch."""

    Config = ActivationCacheConfig
    config: ActivationCacheConfig

    def __init__(self, config: ActivationCacheConfig, *, seed: int = 0) -> None:
        super().__init__(config, seed)
        from sae_lightning.data.cache import read_manifest

        self.manifest = read_manifest(Path(config.path).expanduser(), field="data.path")
        self.cache: ActivationCache | None = None
        self._lm: LMHandle | None = None

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    def _source_name(self) -> str:
        return f"activation cache {self.config.path}"

    def setup(self, stage: str | None = None) -> None:
        self._check_divisible()
        if self.transform is not None:
            return
        from sae_lightning.data.cache import open_cache

        c = self.config
        self.cache = open_cache(
            Path(c.path).expanduser(),
            expect={"model": c.model, "hook": c.hook},
            verify=c.verify_checksums,
            field="data.path",
        )
        self._set_stats(self.cache.stats_for(c.stats_tokens))
        self._restore_validator()
        assert self.transform is not None
        self._val = self.transform(self.cache.val_rows())

    def rank_batch(self, t: int) -> Tensor:
        assert self.cache is not None and self.transform is not None
        rank, world = self._rank()
        per_rank = self.config.batch_size // world
        rows = self.cache.batch_positions(t, self.config.batch_size, self.seed)
        return self.transform(self.cache.read(rows[rank * per_rank : (rank + 1) * per_rank]))

    def language_model(self) -> LMHandle:
        if self._lm is None:
            from sae_lightning.lm.hooks import resolve_hooks
            from sae_lightning.lm.loading import load_model

            m = self.manifest
            source = LMSourceConfig(
                model=m["model"],
                revision=m.get("revision"),
                gguf_file=m.get("gguf_file"),
                model_dtype=m.get("model_dtype", "float32"),
            )
            device = self.config.device or (
                self.trainer.strategy.root_device if self.trainer is not None else "cpu"
            )
            model = load_model(source, device)
            assert self.cache is not None, "call setup() first"
            self._lm = LMHandle(
                model,
                resolve_hooks(model, m["hook"]),
                m["io"],
                self.scale,
                *self.cache.heldout_contexts(),
            )
        self._lm.scale = self.scale
        return self._lm
