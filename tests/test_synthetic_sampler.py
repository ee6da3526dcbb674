"""The synthetic sampler draws atoms without replacement with the law of torch.multinomial."""

from __future__ import annotations

import itertools

import pytest
import torch

from sae_lightning.data.stream import IndexedBatchStream, seeded_generator
from sae_lightning.data.synthetic import (
    AliasTable,
    SparseGenerativeModel,
    SyntheticConfig,
    SyntheticDataModule,
    draw_distinct,
)

N = 40_000


def exact_inclusion(weights: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``(P(i in sample), P(i and j in sample))`` of successive weighted sampling
    without replacement, by enumerating every ordered draw."""
    n = len(weights)
    single = torch.zeros(n, dtype=torch.float64)
    pair = torch.zeros(n, n, dtype=torch.float64)
    total = float(weights.sum())
    for draw in itertools.permutations(range(n), k):
        p, left = 1.0, total
        for i in draw:
            p *= float(weights[i]) / left
            left -= float(weights[i])
        single[list(draw)] += p
        for i, j in itertools.permutations(draw, 2):
            pair[i, j] += p
    return single, pair


def frequencies(chosen: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    hot = torch.zeros(len(chosen), n, dtype=torch.float64).scatter_(1, chosen, 1.0)
    return hot.mean(0), (hot.T @ hot) / len(chosen)


def within_binomial_noise(freq: torch.Tensor, p: torch.Tensor, samples: int) -> None:
    std = (p * (1 - p) / samples).sqrt()
    worst = ((freq - p).abs() / std.clamp_min(1e-12)).max()
    assert worst < 5.0, f"a frequency is {float(worst):.1f} binomial std from its probability"


@pytest.mark.parametrize("exponent,k", [(1.0, 3), (2.0, 4), (0.0, 2)])
def test_inclusion_frequencies_match_the_definition_and_multinomial(exponent, k):
    weights = torch.arange(1, 8, dtype=torch.float64) ** -exponent
    single, pair = exact_inclusion(weights, k)
    chosen = draw_distinct(AliasTable(weights), N, k, torch.Generator().manual_seed(0))
    assert chosen.shape == (N, k)
    assert (chosen.sort(1).values.diff(dim=1) > 0).all(), "an atom was drawn twice in a row"
    freq, joint = frequencies(chosen, len(weights))
    within_binomial_noise(freq, single, N)
    off = ~torch.eye(len(weights), dtype=torch.bool)  # the diagonal is the single frequency
    within_binomial_noise(joint[off], pair[off], N)
    # The old sampler has the same law (and so the same frequencies, within noise).
    old = torch.multinomial(
        weights.float().expand(N, -1), k, replacement=False, generator=torch.Generator()
    )
    within_binomial_noise(frequencies(old, len(weights))[0], single, N)


def test_alias_table_draws_with_the_given_weights():
    weights = torch.tensor([3.0, 0.0, 1.0, 6.0, 0.5])
    drawn = AliasTable(weights).draw((N,), torch.Generator().manual_seed(1))
    freq = torch.bincount(torch.from_numpy(drawn), minlength=5).double() / N
    within_binomial_noise(freq, (weights / weights.sum()).double(), N)


def test_all_atoms_when_k_equals_their_number():
    chosen = draw_distinct(AliasTable(torch.tensor([1.0, 10.0, 100.0])), 50, 3, torch.Generator())
    assert torch.equal(chosen.sort(1).values, torch.arange(3).expand(50, -1))


def test_samples_are_seeded_sums_of_the_chosen_atoms():
    config = SyntheticConfig(d=8, n_atoms=20, n_active=3, noise_std=0.0, batch_size=16)
    model = SparseGenerativeModel(config, seed=3)
    assert torch.equal(model.batch(5), model.batch(5))
    assert not torch.equal(model.batch(5), model.batch(6))
    g = seeded_generator(3, 0, 5)
    chosen = draw_distinct(model.table, 16, 3, g)
    amps = 0.5 + torch.rand(16, 3, generator=g)
    ref = torch.einsum("na,nad->nd", amps.double(), model.atoms.double()[chosen])
    torch.testing.assert_close(model.batch(5).double(), ref, rtol=1e-6, atol=1e-6)


def test_prefetching_stream_yields_the_batches_in_order_and_stops():
    made: list[int] = []

    def make(t: int) -> torch.Tensor:
        made.append(t)
        return torch.full((4, 2), float(t))

    stream = IndexedBatchStream(make, start=3, rank=1, world_size=2, length=9, prefetch=2)
    got = [int(b[0, 0]) for b in stream]
    assert got == [3, 4, 5, 6, 7, 8]
    assert [b.shape for b in IndexedBatchStream(make, length=2)] == [(4, 2), (4, 2)]
    it = iter(IndexedBatchStream(make, prefetch=2))
    made.clear()
    assert int(next(it)[0, 0]) == 0
    it.close()
    # in order, and never more than the prefetch ahead of what was taken (how far the thread
    # got before close() depends on scheduling)
    assert made == list(range(len(made))) and 1 <= len(made) <= 3, made


def test_data_module_trains_on_prefetched_batches_equal_to_the_direct_ones():
    dm = SyntheticDataModule(SyntheticConfig(d=8, batch_size=8), seed=1)
    dm.setup("fit")
    dm.consumed.count = 2
    batches = iter(dm.train_dataloader())
    for t in (2, 3, 4):
        assert torch.equal(next(batches), dm.generative.batch(t))
