"""The host's bound on how many latents are dead: never below the true count, whatever else
writes the counters, so sizing AuxK's selection by it is exact."""

from __future__ import annotations

import pytest
import torch

from sae_lightning.counter_bound import CounterBound

WINDOW = 100


def true_dead(counters: torch.Tensor) -> int:
    return int((counters >= WINDOW).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_bound_holds_and_is_tight_right_after_a_refresh(seed) -> None:
    g = torch.Generator().manual_seed(seed)
    counters = torch.zeros(64, dtype=torch.long)
    bound = CounterBound(counters)
    seen = 0  # the device's token total
    for step in range(30):
        if step % 7 == 6:  # a logging step
            bound.refresh(counters, counters.sort().values.tolist(), seen)
            assert bound.at_most_dead(counters, WINDOW) == true_dead(counters)
            assert bound.host_counts_hold
        n = int(torch.randint(5, 30, (), generator=g))
        intact = bound.intact(counters)
        fired = torch.rand(64, generator=g) < 0.3
        counters.add_(n).masked_fill_(fired, 0)
        seen += n
        bound.advance(counters, n if intact else None)
        at_most = bound.at_most_dead(counters, WINDOW)
        assert at_most is not None and at_most >= true_dead(counters)
    assert true_dead(counters) > 0  # the run went past the window


def test_fresh_counters_bound_no_dead_latent_until_the_window_passed() -> None:
    counters = torch.zeros(8, dtype=torch.long)
    bound = CounterBound(counters)
    for step in range(1, 5):
        counters.add_(30).masked_fill_(torch.arange(8) == step, 0)  # one latent fires
        bound.advance(counters, 30)
        assert bound.at_most_dead(counters, WINDOW) == (0 if step < 4 else 8)


def test_any_other_write_makes_the_bound_unknown_until_a_refresh() -> None:
    counters = torch.zeros(8, dtype=torch.long)
    bound = CounterBound(counters)
    counters.masked_fill_(torch.arange(8) < 2, 2**40)  # held dead from outside
    assert bound.at_most_dead(counters, WINDOW) is None and not bound.intact(counters)
    bound.advance(counters, None)
    assert bound.at_most_dead(counters, WINDOW) is None
    bound.refresh(counters, counters.sort().values.tolist(), 0)
    assert bound.at_most_dead(counters, WINDOW) == 2
    counters.copy_(torch.full((8,), 500))  # a loaded checkpoint
    assert bound.at_most_dead(counters, WINDOW) is None


def test_a_token_count_on_the_device_makes_the_bound_unknown() -> None:
    counters = torch.zeros(8, dtype=torch.long)
    bound = CounterBound(counters)
    n = torch.tensor(5)
    counters.add_(n)
    bound.advance(counters, n)
    assert bound.at_most_dead(counters, WINDOW) is None


def test_a_refresh_checks_the_host_token_count_against_the_device() -> None:
    """Under DDP the host counts a step's tokens as its own times the ranks; a refresh finds
    out when ranks trained on batches of different sizes, and the count is not used again."""
    counters = torch.zeros(8, dtype=torch.long)
    bound = CounterBound(counters)
    for n in (30, 30):
        counters.add_(n)
        bound.advance(counters, n)
    bound.refresh(counters, counters.sort().values.tolist(), 60)  # the device saw 60: agreed
    assert bound.host_counts_hold
    counters.add_(30)
    bound.advance(counters, 30)
    bound.refresh(counters, counters.sort().values.tolist(), 60 + 35)  # it saw 35
    assert not bound.host_counts_hold
    # a refresh after writes the host did not count checks nothing
    fresh = CounterBound(counters)
    counters.fill_(3)
    fresh.advance(counters, None)
    fresh.refresh(counters, counters.sort().values.tolist(), 1000)
    assert fresh.host_counts_hold


def small_module():
    """A TopK SAE module with AuxK (4 latents) and a dead window of 40 tokens."""
    from sae_lightning.module import SAEModule

    return SAEModule(
        d_in=8,
        d_sae=32,
        encoder={"name": "linear"},
        decoder={"name": "linear"},
        sparsity={"name": "topk", "k": 2, "aux_k": 4},
        loss={"dead_window_tokens": 40},
    )


def test_the_module_warns_and_stops_using_host_counts_that_were_off() -> None:
    module = small_module()
    module.compute_step(torch.randn(16, 8), step=0)
    module.tokens_seen += 5  # as if another rank's batch had held 5 more tokens
    with pytest.warns(UserWarning, match="batches of different sizes"):
        module.refresh_dead_bound()
    module.compute_step(torch.randn(16, 8), step=1)
    assert module.counter_bound.at_most_dead(module.tokens_since_fired, 40) is None  # unused


def test_the_module_sizes_auxk_by_how_many_latents_can_be_dead() -> None:
    from sae_lightning.kernels import DeadSelection

    torch.manual_seed(0)
    module = small_module()
    widths = []
    real = module.sae.run

    def run(x, **kw):
        out = real(x, **kw)
        assert isinstance(out.aux_source, DeadSelection)
        widths.append(out.aux_source.values.shape[1])
        return out

    module.sae.run = run
    for step in range(4):
        module.compute_step(torch.randn(16, 8), step=step)
    # 16 tokens a step: every counter is below 40 on steps 0-2 for sure; from step 3 on the
    # host cannot tell which, and the forward pass selects AuxK's full k_aux
    assert widths == [0, 0, 0, 4]
    module.tokens_since_fired.fill_(0)  # written from outside: unknown again
    module.compute_step(torch.randn(16, 8), step=4)
    assert widths[-1] == 4
