"""Reading an activation cache: checked at the door, memory-mapped, shuffled at token level.

The layout is described in :mod:`sae_lightning.data.cache_format`; the writer
(``sae-lightning cache``) is :func:`sae_lightning.data.cache_writer.write_cache`.

Reading memory-maps the shards' activation tensors (the safetensors header gives their byte
offsets), so a batch reads only its own rows. Epoch ``e`` visits the rows in the order of a
seeded pseudo-random permutation (a Feistel network with cycle-walking), which shuffles at
token level over the whole cache without holding a permutation in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae_lightning.data.cache_format import (
    CACHE_COMMAND,
    MANIFEST,
    STORAGE_DTYPES,
    CacheCorruptError,
    load_tensor,
    map_tensor,
    read_manifest,
    sha256_file,
    whole_safetensors,
)
from sae_lightning.data.cache_writer import write_cache
from sae_lightning.data.normalization import NormStats, norm_stats
from sae_lightning.data.stream import seeded_generator
from sae_lightning.errors import ConfigError

__all__ = ["MANIFEST", "ActivationCache", "CacheCorruptError", "open_cache", "write_cache"]

_PERMUTATION = 12  # stream id for seeded_generator
_CHUNK = 1 << 16  # stream positions whose rows are computed together

# ---- permutation ----------------------------------------------------------------------------


def _mix(x: Tensor, key: int, mask: int) -> Tensor:
    """A 32-bit integer hash of ``x`` (all products stay below 2**63)."""
    x = (x ^ key) & 0xFFFFFFFF
    x = (x * 0x45D9F3B) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & 0xFFFFFFFF
    return (x ^ (x >> 16)) & mask


def _feistel(x: Tensor, half_bits: int, keys: list[int]) -> Tensor:
    mask = (1 << half_bits) - 1
    left, right = x >> half_bits, x & mask
    for key in keys:
        left, right = right, left ^ _mix(right, key, mask)
    return (left << half_bits) | right


def permute(index: Tensor, n: int, key: int) -> Tensor:
    """A bijection of ``[0, n)`` chosen by ``key``, applied to ``index`` (int64).

    A Feistel network permutes ``[0, 4**h)`` for the smallest ``4**h >= n``; values that land
    outside ``[0, n)`` are sent through it again until they land inside (cycle-walking), which
    keeps it a bijection of ``[0, n)``.
    """
    half_bits = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    g = torch.Generator().manual_seed(key)
    keys = [int(k) for k in torch.randint(0, 2**31, (4,), generator=g)]
    y = _feistel(index.long(), half_bits, keys)
    outside = y >= n
    while bool(outside.any()):
        y[outside] = _feistel(y[outside], half_bits, keys)
        outside = y >= n
    return y


def epoch_key(seed: int, epoch: int) -> int:
    g = seeded_generator(seed, _PERMUTATION, epoch)
    return int(torch.randint(0, 2**62, (1,), generator=g))


# ---- reading --------------------------------------------------------------------------------


@dataclass
class ActivationCache:
    """A complete cache folder, opened for reading.

    Attributes:
        path: the folder.
        manifest: its parsed ``manifest.json``.
    """

    path: Path
    manifest: dict[str, Any]

    def __post_init__(self) -> None:
        self.train = [s for s in self.manifest["shards"] if s["split"] == "train"]
        self.val = [s for s in self.manifest["shards"] if s["split"] == "val"]
        sizes = torch.tensor([s["rows"] for s in self.train], dtype=torch.long)
        self.starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
        self.rows = int(self.starts[-1])
        self._maps: dict[int, Tensor] = {}
        self._chunks: dict[tuple[int, int], Tensor] = {}

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    def _shard(self, i: int) -> Tensor:
        if i not in self._maps:
            self._maps[i] = map_tensor(self.path / self.train[i]["file"], "activations")
        return self._maps[i]

    def read(self, rows: Tensor) -> Tensor:
        """Training rows ``rows`` (indices into the whole cache), in that order, stored dtype.

        One ``index_select`` per shard touched, straight into the output when one shard holds
        them all; otherwise the rows are grouped by shard with one sort, so the work per shard
        is a few operations whatever the number of shards.
        """
        dtype = STORAGE_DTYPES[self.manifest["storage_dtype"]]
        out = torch.empty(len(rows), self.d_in, dtype=dtype)
        if len(rows) == 0:
            return out
        shard = torch.searchsorted(self.starts, rows, right=True) - 1
        first, last = int(shard.min()), int(shard.max())
        if first == last:
            return torch.index_select(self._shard(first), 0, rows - self.starts[first], out=out)
        order = shard.argsort(stable=True)  # the rows of each shard, together
        ends = torch.bincount(shard, minlength=len(self.train)).cumsum(0).tolist()
        begin = 0
        for i, end in enumerate(ends):
            if end > begin:
                where = order[begin:end]  # positions in the batch of shard i's rows
                local = rows[where] - self.starts[i]
                out.index_copy_(0, where, torch.index_select(self._shard(i), 0, local))
            begin = end
        return out

    def batch_positions(self, t: int, batch_size: int, seed: int) -> Tensor:
        """Row indices of global batch ``t``: positions ``[t B, (t + 1) B)`` of the stream whose
        epoch ``e`` is the rows in the order of permutation ``e``.

        The permutation acts on each position alone, so the rows of ``_CHUNK`` positions are
        computed at once and kept: the Python work of cycle-walking, some hundreds of small
        operations, is paid once per chunk instead of once per batch.
        """
        first = t * batch_size
        chunk = first // _CHUNK
        end = (first + batch_size + _CHUNK - 1) // _CHUNK
        parts = [self._chunk_rows(c, seed) for c in range(chunk, end)]
        rows = parts[0] if len(parts) == 1 else torch.cat(parts)
        offset = first - chunk * _CHUNK
        return rows[offset : offset + batch_size].clone()

    def _chunk_rows(self, chunk: int, seed: int) -> Tensor:
        """Rows at positions ``[chunk C, (chunk + 1) C)`` of the stream, ``C = _CHUNK``."""
        key = (chunk, seed)
        cached = self._chunks.get(key)
        if cached is not None:
            return cached
        position = chunk * _CHUNK + torch.arange(_CHUNK, dtype=torch.long)
        epoch, within = position // self.rows, position % self.rows
        out = torch.empty_like(position)
        for e in epoch.unique().tolist():
            sel = epoch == e
            out[sel] = permute(within[sel], self.rows, epoch_key(seed, e))
        self._chunks = {key: out, **dict(list(self._chunks.items())[:1])}  # the last two
        return out

    def stats_for(self, n: int) -> NormStats:
        """Norm statistics of the first ``n`` rows (the manifest's, when it used the same n)."""
        saved = self.manifest.get("stats")
        if saved is not None and int(saved["tokens"]) == min(n, self.rows):
            return NormStats.from_dict(saved)
        return norm_stats(self.read(torch.arange(min(n, self.rows))))

    def val_rows(self) -> Tensor:
        parts = [load_tensor(self.path / s["file"], "activations") for s in self.val]
        return torch.cat(parts) if parts else torch.zeros(0, self.d_in)

    def heldout_contexts(self) -> tuple[Tensor, Tensor]:
        """``(ids, keep)`` of the held-out contexts, each ``(n, context_length)``."""
        ids = [load_tensor(self.path / s["file"], "input_ids").long() for s in self.val]
        keep = [load_tensor(self.path / s["file"], "input_keep").bool() for s in self.val]
        return torch.cat(ids), torch.cat(keep)


def open_cache(path: Path, *, expect: dict[str, Any], verify: bool, field: str) -> ActivationCache:
    """Open the cache at ``path`` after checking it serves this recipe.

    Args:
        path: cache folder.
        expect: manifest fields and the values the recipe has for them.
        verify: recompute every shard's sha256 and compare with the manifest.
        field: the recipe field naming the cache, for messages.

    Raises:
        ConfigError: no complete cache, or a manifest field differs from the recipe (the error
            names that field).
        CacheCorruptError: a shard is missing or its checksum differs (names the file).
    """
    manifest = read_manifest(path, field)
    for key, value in expect.items():
        if manifest.get(key) != value:
            raise ConfigError(
                f"data.{key}",
                f"is {value!r}, but the cache at {str(path)!r} was written with "
                f"{key}={manifest.get(key)!r}",
                f"re-run `{CACHE_COMMAND}` for this recipe, or point {field} at a matching cache",
            )
    for shard in manifest["shards"]:
        file = path / shard["file"]
        if not file.is_file():
            raise CacheCorruptError(
                f"cache shard {file} listed in {path / MANIFEST} is missing; "
                f"re-run `{CACHE_COMMAND}` to rewrite it"
            )
        if not verify and not whole_safetensors(file):
            raise CacheCorruptError(
                f"cache shard {file} is shorter than its header says (a truncated copy?); "
                f"delete it and re-run `{CACHE_COMMAND}`, or set {field.rsplit('.', 1)[0]}"
                ".verify_checksums: true to check every shard"
            )
        if verify and sha256_file(file) != shard["sha256"]:
            raise CacheCorruptError(
                f"cache shard {file} does not match its sha256 in {path / MANIFEST}; delete "
                f"the file and re-run `{CACHE_COMMAND}` to rewrite it"
            )
    return ActivationCache(path, manifest)
