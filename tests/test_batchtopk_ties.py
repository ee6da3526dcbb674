"""BatchTopK's tie rule on every path that splits the batch: exactly ``k x batch`` entries are
kept, and of those equal to the threshold, the first in the global batch's row-major order.

The batches here tie on purpose: whole rows repeat (a language model's first token in every
context) and latents repeat (a resampled twin), so the threshold falls inside a run of equal
values spread over rows, ranks and shards. Each split path must keep exactly the entries one
process keeps on the whole batch. Ranks are emulated in one process: a first pass records what
each rank sends to its all-gathers, a second replays every rank's message (the real multi-process
runs are in tests/test_ddp.py and tests/test_model_parallel.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sae_lightning.components.sparsity import batchtopk
from sae_lightning.kernels import select as select_module
from sae_lightning.kernels.select import batch_topk_select, kept_by_position, threshold_select
from sae_lightning.parallel import selection

SEEDS = [0, 1, 2]


def tied_acts(seed: int, rows: int = 8, n: int = 12) -> torch.Tensor:
    """Non-negative activations where the k x rows largest end inside a run of ties."""
    torch.manual_seed(seed)
    acts = torch.rand(rows, n)
    acts[:, 3] = acts[:, 7]  # twin latents
    acts[1::3] = acts[0]  # repeated rows
    k = 3
    threshold = acts.flatten().topk(k * rows).values.min()
    acts[acts.flatten().argsort().view(rows, n) % 5 == 0] = threshold  # more ties, everywhere
    above, at = int((acts > threshold).sum()), int((acts == threshold).sum())
    assert above < k * rows < above + at  # the cut falls inside the ties
    return acts


def reference_mask(acts: torch.Tensor, n_keep: int) -> torch.Tensor:
    """One process: the ``n_keep`` largest, ties by row-major position (a stable sort)."""
    order = acts.flatten().sort(descending=True, stable=True).indices[:n_keep]
    return torch.zeros(acts.numel(), dtype=torch.bool).index_fill_(0, order, True).view_as(acts)


class Emulated:
    """Collectives of emulated ranks: ``rank`` sends, the replay hands back every rank's."""

    def __init__(self, world: int) -> None:
        self.world, self.rank, self.replay = world, 0, False
        self.sent: dict[tuple[int, int], torch.Tensor] = {}  # (rank, call) -> message
        self.calls = 0

    def message(self, mine: torch.Tensor) -> list[torch.Tensor]:
        key = (self.rank, self.calls)
        self.calls += 1
        self.sent.setdefault(key, mine.clone())
        if not self.replay:
            return [mine.clone() for _ in range(self.world)]
        return [self.sent[(r, key[1])].clone() for r in range(self.world)]

    def start(self, rank: int) -> None:
        self.rank, self.calls = rank, 0


@pytest.mark.parametrize("seed", SEEDS)
def test_one_process_keeps_exactly_k_per_row_on_average_ties_by_position(seed) -> None:
    acts = tied_acts(seed)
    n_keep = 3 * acts.shape[0]
    codes = batchtopk.batch_topk(acts, 3)
    assert torch.equal(codes != 0, reference_mask(acts, n_keep))
    sel = batch_topk_select(acts, n_keep)
    assert int(sel.valid.sum()) == n_keep
    flat = sel.rows * acts.shape[1] + sel.indices
    assert torch.equal(flat, reference_mask(acts, n_keep).flatten().nonzero().flatten())


@pytest.mark.parametrize("seed", SEEDS)
def test_a_padded_selection_filtered_by_position_keeps_the_same(seed) -> None:
    """The expander's path: every entry at or above the threshold, then the quota's ties."""
    acts = tied_acts(seed)
    n_keep = 3 * acts.shape[0]
    threshold = acts.flatten().topk(n_keep).values.min()
    values, indices, valid = threshold_select(acts, threshold, inclusive=True)
    kept = kept_by_position(values, indices, threshold, lambda above, tied: n_keep - above)
    dense = torch.zeros_like(acts).scatter_add_(1, indices, values * (kept & valid))
    assert torch.equal(dense != 0, reference_mask(acts, n_keep))


@pytest.mark.parametrize("seed", SEEDS)
def test_data_parallel_ranks_keep_what_one_process_keeps(seed, monkeypatch) -> None:
    acts = tied_acts(seed)  # rows 0-3 on rank 0, rows 4-7 on rank 1
    comm = Emulated(2)
    monkeypatch.setattr(batchtopk, "data_parallel_world_size", lambda: 2)
    monkeypatch.setattr(
        batchtopk.dist,
        "all_gather",
        lambda out, mine: [o.copy_(m) for o, m in zip(out, comm.message(mine), strict=True)],
    )
    monkeypatch.setattr(batchtopk.dist, "get_rank", lambda: comm.rank)
    for replay in (False, True):
        comm.replay = replay
        got = []
        for rank in (0, 1):
            comm.start(rank)
            got.append(
                batchtopk.select_batch_topk(acts[4 * rank : 4 * rank + 4], 3, across_ranks=True)[0]
            )
    assert torch.equal(torch.cat(got) != 0, reference_mask(acts, 3 * 8))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("dp", "tp"), [(1, 2), (2, 2), (2, 1), (1, 3)])
def test_latent_shards_keep_what_one_process_keeps(seed, dp, tp, monkeypatch) -> None:
    acts = tied_acts(seed)  # 8 rows over dp ranks, 12 latents over tp shards
    rows, shard = acts.shape[0] // dp, acts.shape[1] // tp
    n_keep = 3 * acts.shape[0]
    threshold = acts.flatten().topk(n_keep).values.min()
    comm = Emulated(dp * tp)
    monkeypatch.setattr(selection, "all_gather", lambda t, group, dim: comm.message(t))
    keep = torch.zeros_like(acts, dtype=torch.bool)
    for replay in (False, True):
        comm.replay = replay
        for p in range(dp):
            for s in range(tp):
                comm.start(p * tp + s)
                part = acts[p * rows : (p + 1) * rows, s * shard : (s + 1) * shard]
                layout = SimpleNamespace(dp_rank=p, tp_rank=s)
                mask = selection.batch_topk_keep(part, threshold, n_keep, layout, group=object())
                keep[p * rows : (p + 1) * rows, s * shard : (s + 1) * shard] = mask
    assert torch.equal(keep, reference_mask(acts, n_keep))


@pytest.mark.parametrize("seed", SEEDS)
def test_first_true_by_sort_equals_the_static_nonzero(seed) -> None:
    """The fallback for CUDA before torch 2.6 (no ``nonzero_static`` kernel there)."""
    torch.manual_seed(seed)
    mask = torch.rand(200) < 0.3
    for count in (0, 5, int(mask.sum()), 150):
        expected = torch.nonzero_static(mask, size=count, fill_value=200).view(-1)
        assert torch.equal(select_module._first_true_by_sort(mask, count), expected)
        assert torch.equal(select_module.first_true(mask, count), expected)
