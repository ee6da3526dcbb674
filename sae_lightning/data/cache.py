"""The on-disk activation cache: sharded safetensors, a manifest, token-level shuffled reads.

Layout of a cache folder::

    manifest.json                 model, revision, hook, dtype, token counts, stats, shards
    train_00000.safetensors       activations (rows, d), token_ids (tokens,)  int32
    ...
    val_00000.safetensors         the held-out contexts: activations, token_ids, input_ids

Rows are ordered context by context, position by position, one per hook. Each shard holds
whole contexts and is written to a temporary file and renamed, so a killed run leaves only
whole shards; the manifest (with every shard's sha256) is written last. Re-running skips the
shards already there (checking that they belong to the same recipe and corpus).

Reading memory-maps the shards' activation tensors (the safetensors header gives their byte
offsets), so a batch reads only its own rows. Epoch ``e`` visits the rows in the order of a
seeded pseudo-random permutation (a Feistel network with cycle-walking), which shuffles at
token level over the whole cache without holding a permutation in memory.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from sae_lightning.atomic import atomic_write, atomic_write_text
from sae_lightning.data.normalization import NormStats, norm_stats
from sae_lightning.data.stream import seeded_generator
from sae_lightning.errors import ConfigError, SaeLightningError

if TYPE_CHECKING:
    from rich.console import Console

    from sae_lightning.data.activations import ActivationDataModule

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_PERMUTATION = 12  # stream id for seeded_generator
_NUMPY = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "BF16": np.int16}
_TORCH = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16}
CACHE_COMMAND = "sae-lightning cache --config <recipe>"


class CacheCorruptError(SaeLightningError):
    """A cache shard is missing or does not match its checksum."""


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


def read_manifest(path: Path, field: str) -> dict[str, Any]:
    """The manifest of the complete cache at ``path``.

    Raises:
        ConfigError: naming ``field`` when there is no complete cache there.
    """
    file = path / MANIFEST
    if not file.is_file():
        raise ConfigError(
            field,
            f"no complete activation cache at {str(path)!r} (no {MANIFEST})",
            f"write it with `{CACHE_COMMAND}`",
        )
    manifest = json.loads(file.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            field,
            f"{file} has format_version {manifest.get('format_version')!r}, "
            f"this sae-lightning reads {FORMAT_VERSION}",
            f"re-create the cache with `{CACHE_COMMAND}`",
        )
    return manifest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors JSON header of ``path`` and the byte offset of its data."""
    with open(path, "rb") as fh:
        size = struct.unpack("<Q", fh.read(8))[0]
        return json.loads(fh.read(size)), 8 + size


def _whole_safetensors(path: Path) -> bool:
    """Whether ``path`` is as long as its safetensors header says (a cheap truncation check)."""
    try:
        header, start = _header(path)
    except (struct.error, ValueError):
        return False
    ends = [info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"]
    return path.stat().st_size >= start + max(ends, default=0)


def map_tensor(path: Path, name: str) -> Tensor:
    """Tensor ``name`` of a safetensors file, memory-mapped (pages load on first touch)."""
    header, start = _header(path)
    info = header[name]
    begin, _ = info["data_offsets"]
    array = np.memmap(
        path,
        dtype=_NUMPY[info["dtype"]],
        mode="c",
        offset=start + begin,
        shape=tuple(info["shape"]),
    )
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if info["dtype"] == "BF16" else tensor


def load_tensor(path: Path, name: str) -> Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.get_tensor(name)


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

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    def _shard(self, i: int) -> Tensor:
        if i not in self._maps:
            self._maps[i] = map_tensor(self.path / self.train[i]["file"], "activations")
        return self._maps[i]

    def read(self, rows: Tensor) -> Tensor:
        """Training rows ``rows`` (indices into the whole cache), in that order, stored dtype."""
        shard = torch.searchsorted(self.starts, rows, right=True) - 1
        out = torch.empty(len(rows), self.d_in, dtype=_TORCH[self.manifest["storage_dtype"]])
        for i in shard.unique().tolist():
            sel = shard == i
            out[sel] = self._shard(i)[rows[sel] - self.starts[i]]
        return out

    def batch_positions(self, t: int, batch_size: int, seed: int) -> Tensor:
        """Row indices of global batch ``t``: positions ``[t B, (t + 1) B)`` of the stream whose
        epoch ``e`` is the rows in the order of permutation ``e``."""
        position = t * batch_size + torch.arange(batch_size, dtype=torch.long)
        epoch, within = position // self.rows, position % self.rows
        out = torch.empty_like(position)
        for e in epoch.unique().tolist():
            sel = epoch == e
            out[sel] = permute(within[sel], self.rows, epoch_key(seed, e))
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
        if not verify and not _whole_safetensors(file):
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


# ---- writing --------------------------------------------------------------------------------


def _identity(dm: ActivationDataModule) -> dict[str, Any]:
    """What determines a cache's content, besides the token ids."""
    c = dm.config
    return {
        "format_version": FORMAT_VERSION,
        "model": c.model,
        "revision": c.revision,
        "gguf_file": c.gguf_file,
        "model_dtype": c.model_dtype,
        "hook": c.hook,
        "hooks": dm.hooks,
        "io": c.io,
        "dtype": c.dtype,
        "context_length": c.context_length,
        "prepend_bos": c.prepend_bos,
        "exclude_special_tokens": c.exclude_special_tokens,
        "d_in": dm.d_in,
    }


def _fingerprint(identity: dict[str, Any], dm: ActivationDataModule) -> str:
    assert dm.corpus is not None
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for part in (dm.corpus.train, dm.corpus.val):
        digest.update(part.ids.numpy().tobytes())
        digest.update(part.keep.numpy().tobytes())
    return digest.hexdigest()


def _plan(dm: ActivationDataModule) -> list[tuple[str, str, int, int]]:
    """``(file, split, first context, end context)`` of every shard."""
    assert dm.corpus is not None
    c = dm.config
    per_context = c.context_length * len(dm.hooks)
    step = max(1, c.shard_tokens // per_context)
    plan = []
    for split, contexts in (("train", dm.corpus.train), ("val", dm.corpus.val)):
        n = len(contexts)
        for i, first in enumerate(range(0, n, step)):
            plan.append((f"{split}_{i:05d}.safetensors", split, first, min(n, first + step)))
    return plan


def estimate_bytes(dm: ActivationDataModule) -> tuple[int, int]:
    """``(activation rows, bytes on disk)`` the cache of ``dm`` will take."""
    assert dm.corpus is not None
    tokens = sum(int(p.keep.sum()) for p in (dm.corpus.train, dm.corpus.val))
    rows = tokens * len(dm.hooks)
    itemsize = torch.empty(0, dtype=torch.float32).to(_dtype(dm)).element_size()
    val_ids = dm.corpus.val.ids.numel() * 4
    return rows, rows * dm.d_in * itemsize + tokens * 4 + val_ids


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _dtype(dm: ActivationDataModule) -> torch.dtype:
    from sae_lightning.lm.loading import DTYPES

    return DTYPES[dm.config.dtype]


def _existing(file: Path, fingerprint: str, cache_dir: Path) -> bool:
    """Whether ``file`` is a whole shard of this cache (raises if it belongs to another)."""
    if not file.is_file():
        return False
    header, _ = _header(file)
    found = header.get("__metadata__", {}).get("fingerprint")
    if found != fingerprint:
        raise ConfigError(
            "data.cache_dir",
            f"{str(cache_dir)!r} holds shards of another recipe or corpus ({file.name})",
            "delete the folder or choose another cache_dir",
        )
    return True


def write_cache(dm: ActivationDataModule, console: Console) -> dict[str, Any]:
    """Harvest every training and held-out context of ``dm`` into its ``cache_dir``.

    Prints the estimated size first and a progress bar while writing; resumes a killed run.

    Returns:
        The manifest written.

    Raises:
        ConfigError: ``data.cache_dir`` is unset, or holds a different cache.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from safetensors.torch import save

    from sae_lightning._version import __version__

    c = dm.config
    if c.cache_dir is None:
        raise ConfigError("data.cache_dir", "is not set", "name the folder to write the cache to")
    out = Path(c.cache_dir).expanduser()
    dm.load()
    assert dm.corpus is not None and dm.harvester is not None
    identity = _identity(dm)
    fingerprint = _fingerprint(identity, dm)
    if (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("fingerprint") == fingerprint:
            console.print(f"cache at {out} is complete; nothing to do", soft_wrap=True)
            return manifest
        raise ConfigError(
            "data.cache_dir",
            f"{str(out)!r} holds a cache of another recipe or corpus",
            "delete the folder or choose another cache_dir",
        )
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.safetensors.*.tmp"):  # left by a killed run
        stale.unlink()
    plan = _plan(dm)
    rows, size = estimate_bytes(dm)
    console.print(
        f"caching {rows:,} activations ({len(dm.hooks)} hook(s) x d={dm.d_in}, {c.dtype}) "
        f"in {len(plan)} shards: about {human_bytes(size)} in {out}",
        soft_wrap=True,
    )
    shards = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} contexts"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        total = len(dm.corpus.train) + len(dm.corpus.val)
        task = progress.add_task("harvesting", total=total)
        for name, split, first, end in plan:
            contexts = dm.corpus.train if split == "train" else dm.corpus.val
            file = out / name
            if not _existing(file, fingerprint, out):
                index = torch.arange(first, end)
                tensors = {
                    "activations": dm.harvester(contexts, index).contiguous(),
                    "token_ids": contexts.ids[index][contexts.keep[index]].int(),
                }
                if split == "val":
                    tensors["input_ids"] = contexts.ids[index].int()
                    tensors["input_keep"] = contexts.keep[index].to(torch.uint8)
                data = save(tensors, metadata={"fingerprint": fingerprint, "split": split})
                atomic_write(file, lambda fh, data=data: fh.write(data))
            header, _ = _header(file)
            shards.append(
                {
                    "file": name,
                    "split": split,
                    "contexts": [first, end],
                    "rows": int(header["activations"]["shape"][0]),
                    "sha256": sha256_file(file),
                }
            )
            progress.advance(task, end - first)
    manifest = {
        **identity,
        "fingerprint": fingerprint,
        "sae_lightning_version": __version__,
        "storage_dtype": _header(out / shards[0]["file"])[0]["activations"]["dtype"],
        "tokens": int(dm.corpus.train.keep.sum()),
        "rows": sum(s["rows"] for s in shards if s["split"] == "train"),
        "val_tokens": int(dm.corpus.val.keep.sum()),
        "val_rows": sum(s["rows"] for s in shards if s["split"] == "val"),
        "shards": shards,
    }
    cache = ActivationCache(out, manifest)
    manifest["stats"] = norm_stats(
        cache.read(torch.arange(min(c.stats_tokens, cache.rows)))
    ).to_dict()
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    console.print(
        f"wrote {out / MANIFEST}: {manifest['rows']:,} training activations", soft_wrap=True
    )
    return manifest
