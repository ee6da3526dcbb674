"""The random left-d-regular expander mask, regenerated bit for bit from one integer seed.

Follows ``_sample_mask`` of the paper's code (rodrgo/expander-sae, models/expander.py): each
latent (dictionary column) draws ``d`` distinct input rows uniformly; rows no latent touches are
repaired by moving one entry of an over-covered row there, so every column keeps exactly ``d``.
The paper's code draws with numpy; we use a seeded ``torch.Generator`` so the plugin needs no
numpy, which means masks match the paper's in distribution, not bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_lightning.errors import ConfigError

MASK_SEED_OFFSET = 10_000
"""The mask generator is seeded with ``seed + 10_000`` (as the paper's code does), so it is
decorrelated from the value initialisation, which uses ``seed`` itself."""

_CHUNK_ELEMENTS = 1 << 22
"""Columns are drawn in chunks of ``_CHUNK_ELEMENTS // d_in`` to bound the temporary memory;
the chunk size depends only on ``d_in``, so the mask stays a function of the seed and shape."""

_REPAIR_TRIES = 64
_REROLLS = 32


def check_mask_shape(d_in: int, d_sae: int, d: int) -> None:
    """Reject a degree no mask can satisfy.

    Raises:
        ConfigError: on field ``d`` when ``d > d_in`` or ``d * d_sae < d_in`` (some row empty).
    """
    if d > d_in:
        raise ConfigError(
            "d",
            f"d={d} exceeds d_in={d_in}: a latent cannot touch more input rows than exist",
            f"choose d <= {d_in}",
        )
    if d * d_sae < d_in:
        raise ConfigError(
            "d",
            f"d * d_sae = {d} * {d_sae} = {d * d_sae} < d_in = {d_in}, so some input dimension "
            "would be reached by no latent",
            f"choose d >= {-(-d_in // d_sae)} or a larger d_sae",
        )


def _draw(d_in: int, d_sae: int, d: int, gen: torch.Generator) -> Tensor:
    """``(d_sae, d)`` rows: ``d`` distinct uniform rows per column (the top-d of uniform noise)."""
    chunk = max(1, _CHUNK_ELEMENTS // d_in)
    parts = []
    for start in range(0, d_sae, chunk):
        noise = torch.rand(min(chunk, d_sae - start), d_in, generator=gen)  # (chunk, d_in)
        parts.append(noise.topk(d, dim=1, sorted=False).indices)
    return torch.cat(parts)


def _repair(rows: Tensor, d_in: int, gen: torch.Generator) -> bool:
    """Give every empty row an entry taken from a row covered at least twice; in place.

    Returns:
        True when no row is empty afterwards.
    """
    flat = rows.view(-1)
    counts = torch.bincount(flat, minlength=d_in)
    for r in (counts == 0).nonzero().flatten().tolist():
        for _ in range(_REPAIR_TRIES):
            slot = int(torch.randint(flat.numel(), (1,), generator=gen))
            q = int(flat[slot])
            if counts[q] >= 2:  # r is empty, so it is not yet in this column's support
                flat[slot] = r
                counts[q] -= 1
                counts[r] += 1
                break
    return bool((counts > 0).all())


def sample_mask(d_in: int, d_sae: int, d: int, seed: int) -> Tensor:
    """The row indices of a random left-``d``-regular mask with no empty row.

    Args:
        d_in: number of input rows ``m``.
        d_sae: number of latents (columns) ``n``.
        d: rows per latent.
        seed: the mask is a pure function of ``(d_in, d_sae, d, seed)``.

    Returns:
        ``(d_sae, d)`` int64, each row of the result sorted and without repeats.

    Raises:
        ConfigError: on field ``d`` when the shape admits no such mask.
        RuntimeError: when no mask without empty rows was found after 32 re-rolls (only for
            ``d * d_sae`` barely above ``d_in``).
    """
    check_mask_shape(d_in, d_sae, d)
    gen = torch.Generator().manual_seed(seed + MASK_SEED_OFFSET)
    for _ in range(_REROLLS):
        rows = _draw(d_in, d_sae, d, gen)
        if _repair(rows, d_in, gen):
            return rows.sort(dim=1).values
    raise RuntimeError(
        f"no expander mask without empty rows after {_REROLLS} draws for d_in={d_in}, "
        f"d_sae={d_sae}, d={d}; raise d or d_sae so that d * d_sae is well above d_in"
    )
