"""A resumable stream of batches whose content is a pure function of the batch index.

Because batch ``t`` is always the same tensor, a run resumed at step ``t`` sees exactly the data
an uninterrupted run would have seen, and each DDP rank takes its own slice of the same global
batch, so ``world_size`` processes train on what one process would.
:class:`IndexedDataModule` is the DataModule side of it: the checkpointed position, batch
validation and the loaders, shared by every data module built on such batches.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Protocol

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from sae_lightning.data.validation import BatchValidator
from sae_lightning.errors import ConfigError

BatchFn = Callable[[int], Tensor]
"""``make_batch(t) -> (global_batch, d_in)``: deterministic in ``t``."""


class IndexedBatchStream(IterableDataset):
    """Yields ``make_batch(start), make_batch(start + 1), ...``, this rank's slice of each.

    Batches are produced ``prefetch`` ahead in a background thread, so the next batch is made
    while the training step runs (and while Lightning's own one-batch lookahead waits). Which
    batch comes at which position does not depend on it: batch ``t`` is still
    ``make_batch(t)``.

    Args:
        make_batch: deterministic batch factory (a tensor or a tuple of tensors).
        start: index of the first batch to yield (the number already consumed).
        rank, world_size: which contiguous slice of each global batch this process takes.
        length: number of batches in total (None: endless).
        prefetch: batches produced ahead in a background thread (0: in the caller's thread).
        pin_memory: pin each batch in page-locked memory, for asynchronous copies to a GPU.
        threads: torch threads of the background thread (None: the process's setting). On a
            CPU run the training step already uses every core; a producer with a thread team
            of its own would take cores from it at each of its parallel operations, so the
            data modules give it one thread there.
    """

    def __init__(
        self,
        make_batch: Callable[[int], Any],
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        length: int | None = None,
        prefetch: int = 2,
        pin_memory: bool = False,
        threads: int | None = None,
    ) -> None:
        super().__init__()
        self.make_batch = make_batch
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self.length = length
        self.prefetch = prefetch
        self.pin_memory = pin_memory
        self.threads = threads

    def _produce(self, t: int) -> Any:
        with torch.no_grad():  # a new thread starts with grad mode on
            batch = self.make_batch(t)
        if self.world_size > 1:
            per_rank = batch.shape[0] // self.world_size
            batch = batch[self.rank * per_rank : (self.rank + 1) * per_rank]
        return _pinned(batch) if self.pin_memory else batch

    def _indices(self) -> Iterator[int]:
        t = self.start
        while self.length is None or t < self.length:
            yield t
            t += 1

    def __iter__(self) -> Iterator[Any]:
        if self.prefetch <= 0:
            yield from map(self._produce, self._indices())
            return
        pool = concurrent.futures.ThreadPoolExecutor(1, "batches")
        if self.threads is not None:
            own_threads(pool, self.threads)
        pending: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
        indices = self._indices()
        try:
            for t in itertools.islice(indices, self.prefetch):
                pending.append(pool.submit(self._produce, t))
            while pending:
                batch = pending.popleft().result()
                for t in itertools.islice(indices, 1):
                    pending.append(pool.submit(self._produce, t))
                yield batch
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)


def own_threads(pool: concurrent.futures.ThreadPoolExecutor, threads: int) -> None:
    """Give the one thread of ``pool`` ``threads`` torch threads, leaving the caller's as they are.

    ``torch.set_num_threads`` sets the calling thread's OpenMP team size and the process-wide
    default that a thread adopts at its first parallel operation. So the worker first adopts
    the default (``get_num_threads`` does), then sets its own size; the caller then puts the
    default back, which leaves the worker's team alone.
    """
    caller = torch.get_num_threads()

    def configure() -> None:
        torch.get_num_threads()
        torch.set_num_threads(threads)

    try:
        pool.submit(configure).result()
    finally:
        torch.set_num_threads(caller)


def _pinned(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.pin_memory()
    return type(batch)(*(_pinned(part) for part in batch))


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer keys (e.g. ``(seed, stream_id, batch_index)``)."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (k + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return torch.Generator().manual_seed(h & 0x7FFFFFFFFFFFFFFF)


class ConsumedBatches:
    """Counts training batches as they reach the model, for the DataModule's checkpoint state."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict[str, Any]:
        return {"batches_consumed": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state.get("batches_consumed", 0))


class BatchSizes(Protocol):
    """The config fields :class:`IndexedDataModule` reads."""

    batch_size: int
    """Global training batch size, split across ranks."""
    val_batch_size: int
    """Validation batch size."""


class IndexedDataModule(pl.LightningDataModule):
    """A DataModule whose training batch ``t`` is a pure function of ``(seed, t)``.

    Why: with batches recomputed from their index, the position (number of batches consumed)
    is the whole checkpoint state of the stream, so a resumed run continues with exactly the
    batch an uninterrupted run would have seen, and every DDP rank can build its own slice.

    A subclass sets ``config`` (with ``batch_size`` and ``val_batch_size``) and ``validator``
    (a :class:`BatchValidator`; it may stay None until ``setup``), calls
    :meth:`check_batch_size` in ``setup``, and implements :meth:`rank_batch` and
    :meth:`validation_data`. This class gives the loaders, the per-batch validation that also
    counts consumed batches, and ``state_dict``/``load_state_dict`` (position and dropped
    rows; extend them for more state).

    Attributes:
        split_validation: each rank validates its own strided slice of the validation set
            (True), or every rank validates all of it (False).
    """

    config: BatchSizes
    split_validation: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.consumed = ConsumedBatches()
        self.validator: BatchValidator | None = None

    def rank_and_world(self) -> tuple[int, int]:
        """``(data-parallel rank, data-parallel size)`` of this process, ``(0, 1)`` without a
        trainer: the global rank and world size, except under ``model_parallel``, where the
        ranks of one tensor-parallel group share the same rows."""
        if self.trainer is None:
            return 0, 1
        sampler = getattr(self.trainer, "distributed_sampler_kwargs", None)
        if sampler is not None:
            return sampler["rank"], sampler["num_replicas"]
        return self.trainer.global_rank, self.trainer.world_size

    def check_batch_size(self) -> None:
        """Refuse a global batch that does not split evenly across the ranks.

        Raises:
            ConfigError: naming ``data.batch_size``.
        """
        world = self.rank_and_world()[1]
        if self.config.batch_size % world:
            raise ConfigError(
                "data.batch_size",
                f"{self.config.batch_size} is not divisible by the {world} ranks",
                "use a multiple of the number of devices",
            )

    def rank_batch(self, t: int) -> Tensor:  # pragma: no cover - protocol
        """This rank's rows of global training batch ``t``: identical for the same seed and
        ``t``, whatever ran before."""
        raise NotImplementedError

    def validation_data(self) -> Tensor:  # pragma: no cover - protocol
        """The whole validation set at the training grid (after ``setup``)."""
        raise NotImplementedError

    def on_gpu(self) -> bool:
        """Whether training runs on a CUDA device (batches are then pinned for async copies)."""
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def train_batches(self, make_batch: Callable[[int], Any]) -> DataLoader:
        """A loader of ``make_batch(t)`` from the checkpointed position on, made ahead in a
        background thread: pinned on CUDA, with one torch thread on a CPU run (the training
        step has the cores)."""
        gpu = self.on_gpu()
        stream = IndexedBatchStream(
            make_batch, self.consumed.count, pin_memory=gpu, threads=None if gpu else 1
        )
        return DataLoader(stream, batch_size=None, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        return self.train_batches(self.rank_batch)

    def val_dataloader(self) -> DataLoader:
        val = self.validation_data()
        if self.split_validation:
            rank, world = self.rank_and_world()
            val = val[rank::world]
        return DataLoader(TensorDataset(val), batch_size=self.config.val_batch_size)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training and self.validator is not None:
            self.consumed.count += 1
            return self.validator(batch, self.consumed.count - 1)
        return batch

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.consumed.state_dict())
        if self.validator is not None:
            state.update(self.validator.state_dict())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consumed.load_state_dict(state_dict)
        if self.validator is not None:
            self.validator.load_state_dict(state_dict)
