"""Buffers the kernels keep from step to step, and how large a chunk they materialise.

On CPU a fresh multi-megabyte tensor is a fresh ``mmap`` whose pages fault in on first touch;
recycling the pre-activation chunk and the weight gradients avoids that cost every step.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import Tensor

DEFAULT_CHUNK_BYTES = 64 * 2**20
"""Largest pre-activation chunk the CPU forward materialises. Fewer, larger chunks amortise the
matrix product's packing of ``W_enc``: at d_in 768, d_sae 16384, batch 4096, 16 MiB chunks were
6% slower than 64 MiB, and 128 MiB or the whole batch no faster (docs/performance.md)."""


def default_chunk_rows(batch: int, n: int, element_size: int, device: torch.device) -> int | None:
    """Rows per chunk so a pre-activation chunk stays under :data:`DEFAULT_CHUNK_BYTES` on CPU.

    On accelerators the caching allocator recycles memory and one big product is fastest, so
    the whole batch goes at once (None).
    """
    if device.type != "cpu":
        return None
    rows = max(1, DEFAULT_CHUNK_BYTES // max(1, n * element_size))
    return None if rows >= batch else rows


class _Workspace:
    """One CPU buffer for pre-activation chunks, kept from step to step.

    A fresh multi-megabyte tensor is a fresh ``mmap``: its pages fault in on first touch, which
    cost as much as a fifth of the product itself. Only the selection reads the chunks, and it
    returns new tensors, so nothing outside
    :class:`~sae_lightning.kernels.encode.TopKEncoder` ever sees this memory. Buffers
    above :data:`DEFAULT_CHUNK_BYTES` (BatchTopK's whole batch) and a concurrent caller (another
    thread) get a temporary buffer instead.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buf: Tensor | None = None

    def borrow(self, numel: int, like: Tensor) -> _Borrowed:
        """A ``(numel,)`` buffer of ``like``'s dtype and device, kept when small enough."""
        keep = like.device.type == "cpu" and numel * like.element_size() <= DEFAULT_CHUNK_BYTES
        if keep and self._lock.acquire(blocking=False):
            buf = self._buf
            if buf is None or buf.numel() < numel or buf.dtype != like.dtype:
                buf = self._buf = torch.empty(numel, dtype=like.dtype)
            return _Borrowed(buf[:numel], self._lock)
        return _Borrowed(like.new_empty(numel), None)


class _Borrowed:
    def __init__(self, buf: Tensor, lock: threading.Lock | None) -> None:
        self.buf, self.lock = buf, lock

    def __enter__(self) -> Tensor:
        return self.buf

    def __exit__(self, *exc: object) -> None:
        if self.lock is not None:
            self.lock.release()


WORKSPACE = _Workspace()


class _GradientPool:
    """Weight-gradient matrices reused from step to step, once nothing else holds them.

    Each step's ``(d_sae, d_in)`` gradients would otherwise be fresh ``mmap``s, zeroed and
    page-faulted in (half the cost of the sparse weight gradient on CPU). A pooled buffer is
    handed out again only when no tensor other than the pool references its storage: after
    ``optimizer.zero_grad(set_to_none=True)`` dropped the ``.grad`` that shared it. A gradient
    still held (accumulation across micro-batches, ``set_to_none=False``, a user's reference)
    makes the pool allocate a new buffer, so results never depend on the pool.
    """

    _MAX_PER_SHAPE = 4

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bufs: dict[tuple[Any, ...], list[tuple[Tensor, int]]] = {}

    def take(self, shape: tuple[int, int], like: Tensor) -> Tensor:
        """A ``shape`` buffer like ``like`` (uninitialised): a free pooled one or a new one."""
        if not _CAN_COUNT_REFS:  # pragma: no cover - torch builds without the counter
            return like.new_empty(shape)
        key = (shape, like.dtype, like.device)
        with self._lock:
            pool = self._bufs.setdefault(key, [])
            for buf, alone in pool:
                if _storage_refs(buf) == alone:
                    return buf
            buf = like.new_empty(shape)
            if len(pool) < self._MAX_PER_SHAPE:
                pool.append((buf, _storage_refs(buf)))
            return buf


def _storage_refs(t: Tensor) -> int:
    """References to ``t``'s storage (tensors and views sharing it, plus its Python handle)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


_CAN_COUNT_REFS = hasattr(torch._C, "_storage_Use_Count")

GRADIENTS = _GradientPool()
