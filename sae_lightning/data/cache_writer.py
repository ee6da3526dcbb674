"""``sae-lightning cache``: harvest a recipe's activations into a sharded safetensors cache.

The LM runs in the calling thread while a background thread serialises, writes and checksums
the previous shard, so the LM never waits for the disk (at most two shards wait in memory).
Each shard holds whole contexts and is written to a temporary file and renamed, so a killed run
leaves only whole shards; the manifest (with every shard's sha256) is written last. Re-running
skips the shards already there (checking that they belong to the same recipe and corpus).

At the end the command prints its harvest throughput against the LM's forward pass to the
deepest hook alone, timed on the same contexts in the same process, half before and half
after the harvest (:mod:`sae_lightning.data.forward_reference`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from sae_lightning.atomic import atomic_write, atomic_write_text
from sae_lightning.data.cache_format import (
    FORMAT_VERSION,
    MANIFEST,
    header,
    map_tensor,
    sha256_file,
)
from sae_lightning.data.forward_reference import ForwardReference
from sae_lightning.data.normalization import norm_stats
from sae_lightning.data.progress import HarvestProgress
from sae_lightning.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console

    from sae_lightning.data.lm_config import LMActivationsConfig
    from sae_lightning.lm.harvest import Harvester
    from sae_lightning.lm.text import Contexts, TokenizedCorpus


class CacheSource(Protocol):
    """What the writer reads from an ``lm_activations`` data module."""

    config: LMActivationsConfig
    hooks: list[str]
    corpus: TokenizedCorpus | None
    harvester: Harvester | None
    seed: int

    @property
    def d_in(self) -> int: ...

    def load(self) -> None: ...


@dataclass(frozen=True)
class ShardPlan:
    """One shard: its file name, split, and the contexts ``[first, end)`` it holds."""

    file: str
    split: str
    first: int
    end: int


def _identity(dm: CacheSource) -> dict[str, Any]:
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


def _fingerprint(identity: dict[str, Any], corpus: TokenizedCorpus) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for part in (corpus.train, corpus.val):
        digest.update(part.ids.numpy().tobytes())
        digest.update(part.keep.numpy().tobytes())
        if part.docs is not None:
            digest.update(part.docs.numpy().tobytes())
    return digest.hexdigest()


def _plan(dm: CacheSource, corpus: TokenizedCorpus) -> list[ShardPlan]:
    c = dm.config
    per_context = c.context_length * len(dm.hooks)
    step = max(1, c.shard_tokens // per_context)
    plan = []
    for split, contexts in (("train", corpus.train), ("val", corpus.val)):
        n = len(contexts)
        for i, first in enumerate(range(0, n, step)):
            plan.append(
                ShardPlan(f"{split}_{i:05d}.safetensors", split, first, min(n, first + step))
            )
    return plan


def estimate_bytes(dm: CacheSource) -> tuple[int, int]:
    """``(activation rows, bytes on disk)`` the cache of ``dm`` will take."""
    from sae_lightning.lm.loading import DTYPES

    assert dm.corpus is not None
    parts = (dm.corpus.train, dm.corpus.val)
    tokens = sum(int(p.keep.sum()) for p in parts)
    rows = tokens * len(dm.hooks)
    itemsize = torch.empty(0, dtype=DTYPES[dm.config.dtype]).element_size()
    per_position = sum(p.ids.numel() for p in parts) * 4  # documents
    val_ids = dm.corpus.val.ids.numel() * 5  # input_ids + input_keep
    return rows, rows * dm.d_in * itemsize + tokens * 4 + per_position + val_ids


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _existing(file: Path, fingerprint: str, cache_dir: Path) -> bool:
    """Whether ``file`` is a whole shard of this cache (raises if it belongs to another)."""
    if not file.is_file():
        return False
    found = header(file)[0].get("__metadata__", {}).get("fingerprint")
    if found != fingerprint:
        raise ConfigError(
            "data.cache_dir",
            f"{str(cache_dir)!r} holds shards of another recipe or corpus ({file.name})",
            "delete the folder or choose another cache_dir",
        )
    return True


def _shard_tensors(
    contexts: Contexts, index: Tensor, activations: Tensor, split: str
) -> dict[str, Tensor]:
    ids, keep = contexts.ids[index], contexts.keep[index]
    tensors = {"activations": activations.contiguous(), "token_ids": ids[keep].int()}
    if contexts.docs is not None:
        tensors["documents"] = contexts.docs[index].int()
    if split == "val":
        tensors["input_ids"] = ids.int()
        tensors["input_keep"] = keep.to(torch.uint8)
    return tensors


def _write_shard(file: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> dict[str, Any]:
    """Write one shard atomically (in the writer thread); its manifest entry without plan."""
    from safetensors.torch import save

    data = save(tensors, metadata=meta)
    atomic_write(file, lambda fh: fh.write(data))
    return {"rows": int(tensors["activations"].shape[0]), "sha256": sha256_file(file)}


def _entry(plan: ShardPlan, written: dict[str, Any]) -> dict[str, Any]:
    return {"file": plan.file, "split": plan.split, "contexts": [plan.first, plan.end], **written}


def _open_output(dm: CacheSource, console: Console) -> tuple[Path, str, dict[str, Any] | None]:
    """``(folder, fingerprint, complete manifest or None)``; refuses another recipe's cache."""
    c = dm.config
    if c.cache_dir is None:
        raise ConfigError("data.cache_dir", "is not set", "name the folder to write the cache to")
    out = Path(c.cache_dir).expanduser()
    dm.load()
    assert dm.corpus is not None
    fingerprint = _fingerprint(_identity(dm), dm.corpus)
    if (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("fingerprint") == fingerprint:
            console.print(f"cache at {out} is complete; nothing to do", soft_wrap=True)
            return out, fingerprint, manifest
        raise ConfigError(
            "data.cache_dir",
            f"{str(out)!r} holds a cache of another recipe or corpus",
            "delete the folder or choose another cache_dir",
        )
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.safetensors.*.tmp"):  # left by a killed run
        stale.unlink()
    return out, fingerprint, None


def write_cache(
    dm: CacheSource, console: Console, progress_seconds: float = 30.0
) -> dict[str, Any]:
    """Harvest every training and held-out context of ``dm`` into its ``cache_dir``.

    Prints the estimated size first, then progress (contexts and tokens; a line at least every
    ``progress_seconds`` when the console is not a terminal), and at the end the harvest
    throughput against the LM forward alone. Resumes a killed run.

    Returns:
        The manifest written.

    Raises:
        ConfigError: ``data.cache_dir`` is unset, or holds a different cache.
    """
    out, fingerprint, complete = _open_output(dm, console)
    if complete is not None:
        return complete
    assert dm.corpus is not None and dm.harvester is not None
    c = dm.config
    plan = _plan(dm, dm.corpus)
    rows, size = estimate_bytes(dm)
    console.print(
        f"caching {rows:,} activations ({len(dm.hooks)} hook(s) x d={dm.d_in}, {c.dtype}) "
        f"in {len(plan)} shards: about {human_bytes(size)} in {out}",
        soft_wrap=True,
    )
    splits = {"train": dm.corpus.train, "val": dm.corpus.val}
    total = sum(len(p) for p in splits.values())
    todo = sum(s.end - s.first for s in plan if not (out / s.file).is_file())
    reference = ForwardReference(dm.harvester, dm.corpus.train, todo)
    if todo:
        console.print(
            f"timing the LM forward alone on {reference.contexts} contexts "
            "(half now, half after the harvest)",
            soft_wrap=True,
        )
        reference.run_half(0)
    written: list[concurrent.futures.Future[dict[str, Any]] | dict[str, Any]] = []
    pending: deque[concurrent.futures.Future[dict[str, Any]]] = deque()
    harvested = 0
    with (
        concurrent.futures.ThreadPoolExecutor(1, "cache-writer") as pool,
        HarvestProgress(console, total, c.context_length, progress_seconds) as progress,
    ):
        for shard in plan:
            contexts, file = splits[shard.split], out / shard.file
            if _existing(file, fingerprint, out):
                rows_there = int(header(file)[0]["activations"]["shape"][0])
                written.append({"rows": rows_there, "sha256": sha256_file(file)})
                progress.advance(shard.end - shard.first, harvested=False)
                continue
            index = torch.arange(shard.first, shard.end)
            acts = _harvest(dm.harvester, contexts, index, progress)
            harvested += len(index)
            while len(pending) >= 2:  # bound the shards waiting in memory
                pending.popleft().result()
            meta = {"fingerprint": fingerprint, "split": shard.split}
            future = pool.submit(
                _write_shard, file, _shard_tensors(contexts, index, acts, shard.split), meta
            )
            pending.append(future)
            written.append(future)
        entries = [
            _entry(s, w if isinstance(w, dict) else w.result())
            for s, w in zip(plan, written, strict=True)
        ]
        elapsed = progress.harvest_seconds()
    manifest = _manifest(dm, out, fingerprint, entries)
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    console.print(
        f"wrote {out / MANIFEST}: {manifest['rows']:,} training activations", soft_wrap=True
    )
    if harvested:
        reference.run_half(1)
        _report_throughput(harvested * c.context_length / max(elapsed, 1e-9), reference, console)
    return manifest


def _harvest(harvester: Harvester, contexts: Contexts, index: Tensor, progress: Any) -> Tensor:
    """Activations of ``contexts[index]``, one LM batch at a time, counted by ``progress``."""
    out = []
    for start in range(0, len(index), harvester.batch_size):
        part = index[start : start + harvester.batch_size]
        out.append(harvester(contexts, part))
        progress.advance(len(part), harvested=True)
    return torch.cat(out)


def _manifest(
    dm: CacheSource, out: Path, fingerprint: str, shards: list[dict[str, Any]]
) -> dict[str, Any]:
    from sae_lightning._version import __version__

    assert dm.corpus is not None
    c, corpus = dm.config, dm.corpus
    train = [s for s in shards if s["split"] == "train"]
    manifest = {
        **_identity(dm),
        "fingerprint": fingerprint,
        "sae_lightning_version": __version__,
        "storage_dtype": header(out / shards[0]["file"])[0]["activations"]["dtype"],
        "tokens": int(corpus.train.keep.sum()),
        "rows": sum(s["rows"] for s in train),
        "val_tokens": int(corpus.val.keep.sum()),
        "val_rows": sum(s["rows"] for s in shards if s["split"] == "val"),
        "documents": corpus.documents,
        "val_documents": corpus.val_documents,
        "document_split": {
            "seed": dm.seed,
            "val_sequences": c.val_sequences,
            "val_documents": c.val_documents,
            "val_fraction": c.val_fraction,
        },
        "shards": shards,
    }
    first: list[Tensor] = []
    for shard in train:  # norm statistics of the first stats_tokens rows
        if sum(len(p) for p in first) >= c.stats_tokens:
            break
        first.append(map_tensor(out / shard["file"], "activations"))
    rows = torch.cat(first)[: c.stats_tokens] if first else torch.zeros(0, dm.d_in)
    manifest["stats"] = norm_stats(rows).to_dict()
    return manifest


def _report_throughput(harvest: float, reference: ForwardReference, console: Console) -> None:
    """Print harvest tokens/s against the LM forward to the deepest hook alone."""
    forward = reference.tokens_per_second()
    console.print(
        f"harvest: {harvest:,.0f} tokens/s; LM forward to the deepest hook alone: "
        f"{forward:,.0f} tokens/s; harvest_over_forward={harvest / forward:.3f}",
        soft_wrap=True,
    )
