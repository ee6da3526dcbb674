"""The running top-N contexts and statistics, merged chunk by chunk, against all at once."""

from __future__ import annotations

import torch

from sae_lightning.inspect.stats import LatentStats
from sae_lightning.inspect.topk import PAD, TopContexts


def test_chunked_top_contexts_equal_a_float64_sort_of_every_context():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    contexts, length, latents, n, before, after = 13, 9, 5, 4, 3, 2
    f = torch.relu(torch.randn(contexts, length, latents, generator=g, dtype=torch.float64))
    ids = torch.randint(0, 50, (contexts, length), generator=g)
    top = TopContexts.empty(n, latents, before, after, dtype=torch.float64)
    for start, end in ((0, 3), (3, 7), (7, 13)):
        top.update(f[start:end], ids[start:end], start)

    peak, pos = f.max(dim=1)  # (contexts, latents)
    for j in range(latents):
        order = sorted(range(contexts), key=lambda c: -float(peak[c, j]))[:n]
        assert top.values[:, j].tolist() == [float(peak[c, j]) for c in order]
        for i, c in enumerate(order):
            p = int(pos[c, j])
            assert top.where[i, j].tolist() == [c, p]
            for w, q in enumerate(range(p - before, p + after + 1)):
                inside = 0 <= q < length
                assert int(top.tokens[i, j, w]) == (int(ids[c, q]) if inside else PAD)
                assert float(top.acts[i, j, w]) == (float(f[c, q, j]) if inside else 0.0)


def test_chunked_statistics_equal_the_whole_stream():
    x = torch.relu(torch.randn(200, 6, dtype=torch.float64)) * 10 ** torch.randn(200, 1)
    whole, parts = LatentStats.empty(6), LatentStats.empty(6)
    whole.update(x)
    for chunk in x.split(37):
        parts.update(chunk)
    assert parts.tokens == 200 and torch.equal(parts.fires, (x > 0).sum(dim=0))
    assert torch.equal(parts.hist, whole.hist) and torch.equal(parts.peak, x.amax(dim=0))
    torch.testing.assert_close(parts.total, x.sum(dim=0), rtol=1e-12, atol=0)
    assert torch.equal(parts.hist.sum(dim=1), parts.fires)
