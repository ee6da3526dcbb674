"""``lm_activations``: activations of a ``transformers`` causal LM, harvested on the fly or cached.

The LM runs over a local text corpus, packed into fixed-length contexts, and the activations at
one or more hook points (module paths, globs allowed) are delivered. With several hooks every
token gives one row per hook, so one SAE learns all of them (a multi-layer SAE).

Held-out contexts come from documents no training context touches (a seeded document split,
:func:`sae_lightning.lm.text.tokenize_corpus`); named ``eval_text`` corpora are packed apart.

Streaming (``cache_dir`` unset): :class:`~sae_lightning.data.lm_streams.MixingStream`.
Cached (``cache_dir`` set, written by ``sae-lightning cache``): each epoch is a seeded
token-level permutation of the whole cache (:mod:`sae_lightning.data.cache`) and each rank
reads only its own rows. Token batches (e2e training, ``model.loss.mode: e2e``): the training
loader yields :class:`~sae_lightning.data.lm_streams.TokenBatch` es of ``token_batch_size``
whole contexts; validation still yields held-out activations (FVU, L0).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from sae_lightning.data.lm_base import ActivationData, LMHandle
from sae_lightning.data.lm_config import LMActivationsConfig, cache_expectations
from sae_lightning.data.lm_streams import MixingStream, TokenBatch, TokenStream, first_rows
from sae_lightning.data.normalization import norm_stats
from sae_lightning.errors import ConfigError
from sae_lightning.lm.loading import DTYPES, hidden_size

if TYPE_CHECKING:
    from sae_lightning.data.cache import ActivationCache
    from sae_lightning.lm.harvest import Harvester
    from sae_lightning.lm.text import Contexts, TokenizedCorpus

__all__ = ["ActivationDataModule", "LMActivationsConfig", "MixingStream", "TokenBatch"]


class ActivationDataModule(ActivationData):
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
        self.eval_sets: dict[str, Contexts] = {}
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
        from sae_lightning.lm.harvest import Harvester
        from sae_lightning.lm.hooks import hook_width, resolve_hooks
        from sae_lightning.lm.loading import load_model, load_tokenizer
        from sae_lightning.lm.text import DocumentSplit, read_documents, tokenize_corpus

        c = self.config
        tokenizer = load_tokenizer(c)
        packing = {
            "context_length": c.context_length,
            "prepend_bos": c.prepend_bos,
            "exclude_special_tokens": c.exclude_special_tokens,
        }
        self.corpus = tokenize_corpus(
            read_documents(c.text, c.text_field),
            tokenizer,
            split=c.document_split(self.seed),
            max_sequences=c.max_sequences,
            **packing,
        )
        self.eval_sets = {
            name: tokenize_corpus(
                read_documents(sources, c.text_field, field=f"data.eval_text.{name}"),
                tokenizer,
                split=DocumentSplit.none(),
                max_sequences=c.eval_sequences,
                field=f"data.eval_text.{name}",
                **packing,
            ).train
            for name, sources in c.eval_text.items()
        }
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
        self.check_batch_size()
        self._check_token_batch_size()
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
        assert self.transform is not None
        self._val = self.transform(self.cache.val_rows())

    def _check_token_batch_size(self) -> None:
        world = self.rank_and_world()[1]
        if self.token_batches and self.config.token_batch_size % world:
            raise ConfigError(
                "data.token_batch_size",
                f"{self.config.token_batch_size} is not divisible by the {world} ranks",
                "use a multiple of the number of devices",
            )

    def train_dataloader(self) -> DataLoader:
        if not self.token_batches:
            return super().train_dataloader()
        self._check_token_batch_size()
        if self.tokens is None:
            self.load()
            assert self.corpus is not None
            self.tokens = TokenStream(self.corpus.train, self.config.token_batch_size, self.seed)
        return self.train_batches(self.rank_tokens)

    def rank_tokens(self, t: int) -> TokenBatch:
        """This rank's contexts of global token batch ``t``."""
        assert self.tokens is not None, "call train_dataloader() first"
        rank, world = self.rank_and_world()
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
        rank, world = self.rank_and_world()
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

    def eval_activations(self, contexts: Contexts) -> Tensor:
        """Kept activations of ``contexts`` at the hooks, transformed as the training data."""
        self.load()
        assert self.harvester is not None and self.transform is not None, "call setup() first"
        return self.transform(self.harvester(contexts))

    def language_model(self) -> LMHandle:
        self.load()
        assert self.model is not None and self.corpus is not None
        val = self.corpus.val
        return LMHandle(
            self.model,
            self.hooks,
            self.config.io,
            self.scale,
            val.ids,
            val.keep,
            self.eval_sets,
            self.eval_activations,
        )
