"""The batch producer's own thread count: one torch thread on CPU runs, the caller's unchanged."""

from __future__ import annotations

import threading

import torch

from sae_lightning.data.stream import IndexedBatchStream


def test_producer_runs_with_its_own_thread_count_and_leaves_the_callers_alone():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: list[int] = []

        def make(t: int) -> torch.Tensor:
            seen.append(torch.get_num_threads())
            return torch.full((4, 2), float(t)) @ torch.ones(2, 2)

        stream = IndexedBatchStream(make, length=3, prefetch=2, threads=1)
        assert [int(b[0, 0]) for b in stream] == [0, 2, 4]
        assert seen == [1, 1, 1]
        assert torch.get_num_threads() == 2
        fresh: list[int] = []  # a thread started later gets the process default, not 1
        worker = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        worker.start()
        worker.join()
        assert fresh == [2]
        seen.clear()
        assert len(list(IndexedBatchStream(make, length=2, prefetch=2))) == 2
        assert seen == [2, 2]  # without ``threads``: the process's setting
    finally:
        torch.set_num_threads(before)
