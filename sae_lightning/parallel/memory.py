"""Bytes per rank of a latent-sharded SAE, by formula (the table in docs/multi-gpu.md).

    python -m sae_lightning.parallel.memory

prints that table. :func:`state_bytes` is checked against the bytes a trained rank holds
(``ShardedSAEModule.parameter_bytes``) in ``tests/test_model_parallel.py``.
"""

from __future__ import annotations

FP32 = 4


def state_bytes(d_in: int, d_sae: int, tp: int, *, grads: bool = True) -> int:
    """Parameters, their gradients (when ``grads``) and Adam's two moments on one rank, fp32.

    Each rank holds ``d_sae / tp`` encoder rows, encoder biases and decoder atoms, and the
    whole ``d_in`` decoder bias.
    """
    shard = d_sae // tp
    params = 2 * shard * d_in + shard + d_in
    copies = 4 if grads else 3  # weights (+ gradients) + exp_avg + exp_avg_sq
    return copies * FP32 * params


def activation_bytes(d_sae: int, tp: int, rows: int) -> int:
    """The local pre-activations and their gradient, ``(rows, d_sae / tp)`` fp32 each."""
    return 2 * FP32 * rows * (d_sae // tp)


def gib(n: int) -> str:
    return f"{n / 2**30:,.1f}"


def table(d_in: int = 4096, rows: int = 4096) -> str:
    """Markdown: state + activations per rank for 1M, 4M and 16M latents and T = 1, 2, 8, 64."""
    sizes = (1, 2, 8, 64)
    lines = [
        "| latents | " + " | ".join(f"T = {t}" for t in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for millions in (1, 4, 16):
        d_sae = millions * 2**20
        cells = [
            f"{gib(state_bytes(d_in, d_sae, t))} + {gib(activation_bytes(d_sae, t, rows))}"
            for t in sizes
        ]
        lines.append(
            f"| {millions}M (2^{20 + millions.bit_length() - 1}) | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
