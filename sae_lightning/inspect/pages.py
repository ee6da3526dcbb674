"""The browser's data: index rows and one dict per latent page (token contexts, statistics)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sae_lightning.inspect.collect import Collected
from sae_lightning.inspect.effects import Effects
from sae_lightning.inspect.stats import LatentStats
from sae_lightning.inspect.topk import PAD


def sig(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits (smaller data files)."""
    return float(f"{value:.{digits}g}")


def token_strings(tokenizer: Any, ids: Tensor) -> dict[int, str]:
    """Each distinct id of ``ids`` decoded on its own (``PAD`` skipped)."""
    unique = [int(i) for i in torch.unique(ids.cpu()) if int(i) != PAD]
    texts = tokenizer.batch_decode([[i] for i in unique])
    return dict(zip(unique, texts, strict=True))


def flags(stats: LatentStats, dense_threshold: float) -> list[str]:
    """``dead`` (never fired), ``dense`` (fires on more than ``dense_threshold``) or ``""``."""
    density = stats.density.tolist()
    fires = stats.fires.tolist()
    return [
        "dead" if f == 0 else "dense" if d > dense_threshold else ""
        for f, d in zip(fires, density, strict=True)
    ]


def top_tokens(collected: Collected, strings: dict[int, str], n: int = 3) -> list[str]:
    """Per latent, the distinct tokens at the maxima of its best contexts, joined by `` | ``."""
    top = collected.top
    peaks = top.tokens[:, :, top.before].T.tolist()  # (latents, N)
    fired = (top.values > 0).T.tolist()
    out = []
    for ids, ok in zip(peaks, fired, strict=True):
        seen: list[str] = []
        for i, fire in zip(ids, ok, strict=True):
            text = strings.get(i, "").strip() or repr(strings.get(i, ""))
            if fire and text not in seen:
                seen.append(text)
            if len(seen) == n:
                break
        out.append(" | ".join(seen))
    return out


def index_rows(collected: Collected, labels: list[str], flag: list[str]) -> list[list[Any]]:
    """``[id, density, max, mean, flag, label]`` per latent."""
    s = collected.stats
    columns = zip(s.density.tolist(), s.peak.tolist(), s.mean.tolist(), strict=True)
    return [
        [j, sig(d), sig(m), sig(mean), flag[j], labels[j]] for j, (d, m, mean) in enumerate(columns)
    ]


def histogram(stats: LatentStats, j: int) -> list[list[float]]:
    """Latent ``j``'s ``[lo, hi, count]`` bins, trimmed to the range it occupies."""
    counts = stats.hist[j].tolist()
    used = [i for i, c in enumerate(counts) if c]
    if not used:
        return []
    edges = stats.edges.tolist()
    return [[sig(edges[i]), sig(edges[i + 1]), counts[i]] for i in range(used[0], used[-1] + 1)]


def latent_pages(
    collected: Collected,
    strings: dict[int, str],
    flag: list[str],
    effects: Effects | None,
    near: tuple[Tensor, Tensor] | None,
) -> Callable[[int], dict[str, Any]]:
    """A function giving latent ``j``'s page data (contexts, histogram, effects, neighbours)."""
    s = collected.stats
    density, peak = s.density.tolist(), s.peak.tolist()
    mean, mean_active = s.mean.tolist(), s.mean_active.tolist()
    top = collected.top.__class__(
        collected.top.values.cpu(),
        collected.top.where.cpu(),
        collected.top.tokens.cpu(),
        collected.top.acts.float().cpu(),
        collected.top.before,
    )

    def named(ids: Tensor, values: Tensor) -> list[list[Any]]:
        return [[strings_of(int(i)), sig(float(v))] for i, v in zip(ids, values, strict=True)]

    def strings_of(i: int) -> str:
        return strings.get(i, f"<{i}>")

    def page(j: int) -> dict[str, Any]:
        contexts = [
            {
                "max": sig(value),
                "context": context,
                "position": position,
                "peak": top.before,
                "tokens": [None if t == PAD else strings_of(t) for t in tokens],
                "acts": [sig(a) for a in acts],
            }
            for value, context, position, tokens, acts in top.latent(j)
        ]
        data: dict[str, Any] = {
            "id": j,
            "flag": flag[j],
            "density": sig(density[j]),
            "max": sig(peak[j]),
            "mean": sig(mean[j]),
            "mean_active": sig(mean_active[j]),
            "hist": histogram(collected.stats, j),
            "contexts": contexts,
        }
        if effects is not None:
            data["up"] = named(effects.up_ids[j], effects.up_values[j])
            data["down"] = named(effects.down_ids[j], effects.down_values[j])
        if near is not None:
            ids, cos = near[0][j].tolist(), near[1][j].tolist()
            data["near"] = [[i, sig(c)] for i, c in zip(ids, cos, strict=True)]
        return data

    return page
