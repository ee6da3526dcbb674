"""``activation_cache``: a cache written by ``sae-lightning cache``, read without the recipe.

Each epoch is a seeded token-level permutation of the whole cache
(:meth:`~sae_lightning.data.cache.ActivationCache.batch_positions`) and each rank reads only its
own rows. The KL callback loads the LM named in the manifest and evaluates on the cache's
held-out contexts.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from sae_lightning.data.cache import ActivationCache, open_cache, read_manifest
from sae_lightning.data.lm_base import ActivationData, LMHandle
from sae_lightning.data.lm_config import ActivationCacheConfig
from sae_lightning.lm.loading import LMSourceConfig


class ActivationCacheDataModule(ActivationData):
    """Activations read from a sharded safetensors cache, shuffled at token level per epoch."""

    Config = ActivationCacheConfig
    config: ActivationCacheConfig

    def __init__(self, config: ActivationCacheConfig, *, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.manifest = read_manifest(Path(config.path).expanduser(), field="data.path")
        self.cache: ActivationCache | None = None
        self._lm: LMHandle | None = None

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    def _source_name(self) -> str:
        return f"activation cache {self.config.path}"

    def setup(self, stage: str | None = None) -> None:
        self.check_batch_size()
        if self.transform is not None:
            return
        c = self.config
        self.cache = open_cache(
            Path(c.path).expanduser(),
            expect={"model": c.model, "hook": c.hook},
            verify=c.verify_checksums,
            field="data.path",
        )
        self._set_stats(self.cache.stats_for(c.stats_tokens))
        assert self.transform is not None
        self._val = self.transform(self.cache.val_rows())

    def rank_batch(self, t: int) -> Tensor:
        assert self.cache is not None and self.transform is not None
        rank, world = self.rank_and_world()
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
