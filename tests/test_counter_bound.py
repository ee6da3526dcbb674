"""The host's bound on the dead-latent counters: it proves "no latent is dead" only when that
holds, whatever else writes the counters, so skipping AuxK's work on it is exact."""

from __future__ import annotations

import torch

from sae_lightning.counter_bound import CounterBound

WINDOW = 100


def test_fresh_counters_are_below_the_window_until_enough_tokens_passed() -> None:
    counters = torch.zeros(8, dtype=torch.long)
    bound = CounterBound(counters)
    for step in range(1, 5):
        assert bound.intact(counters)
        counters.add_(30).masked_fill_(torch.arange(8) == step, 0)  # one latent fires
        bound.advance(counters, 30)
        assert bound.below(counters, WINDOW) == (int(counters.max()) < WINDOW) == (step < 4)


def test_any_other_write_makes_the_bound_unknown_until_a_refresh() -> None:
    counters = torch.zeros(8, dtype=torch.long)
    bound = CounterBound(counters)
    counters.masked_fill_(torch.arange(8) < 2, 2**40)  # held dead from outside
    assert not bound.below(counters, WINDOW) and not bound.intact(counters)
    bound.advance(counters, None)
    assert not bound.below(counters, WINDOW)
    counters.zero_()
    bound.refresh(counters, int(counters.max()))
    assert bound.below(counters, WINDOW)
    counters.copy_(torch.full((8,), 500))  # a loaded checkpoint
    assert not bound.below(counters, WINDOW)


def test_a_token_count_on_the_device_makes_the_bound_unknown() -> None:
    counters = torch.zeros(8, dtype=torch.long)
    bound = CounterBound(counters)
    n = torch.tensor(5)
    counters.add_(n)
    bound.advance(counters, n)
    assert not bound.below(counters, WINDOW)


def test_the_module_skips_auxk_only_while_no_latent_can_be_dead(tmp_path) -> None:
    from sae_lightning.kernels import DeadSelection
    from sae_lightning.module import SAEModule

    torch.manual_seed(0)
    module = SAEModule(
        d_in=8,
        d_sae=32,
        encoder={"name": "linear"},
        decoder={"name": "linear"},
        sparsity={"name": "topk", "k": 2, "aux_k": 4},
        loss={"dead_window_tokens": 40},
    )
    widths, seen = [], []
    real = module.sae.run

    def run(x, **kw):
        out = real(x, **kw)
        assert isinstance(out.aux_source, DeadSelection)
        widths.append(out.aux_source.values.shape[1])
        seen.append(int(module.tokens_since_fired.max()))
        return out

    module.sae.run = run
    for step in range(4):
        module.compute_step(torch.randn(16, 8), step=step)
    # 16 tokens a step: the largest counter is below 40 on steps 0-2 for sure; from step 3
    # on the host cannot tell, and the forward pass selects AuxK's latents
    assert widths == [0, 0, 0, 4], (widths, seen)
    module.tokens_since_fired.fill_(0)  # written from outside: unknown again
    module.compute_step(torch.randn(16, 8), step=4)
    assert widths[-1] == 4
