"""Time one batch of the ``synthetic`` data module against one bare training step.

The synthetic sampler must cost a small fraction of a step (it runs in a background thread
while the previous step trains, but on a CPU it shares the cores). Prints, from one run: the
batch time of the sampler, of the previous sampler (``torch.multinomial`` without replacement
and a gathered ``einsum``) as a reference, the bare TopK step (``expander_common.train_step``)
at the same shape, and ``batch_over_step=<float>`` last.

    OMP_NUM_THREADS=2 python benchmarks/data_throughput.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from expander_common import train_step

from sae_lightning.data.stream import seeded_generator
from sae_lightning.data.synthetic import SparseGenerativeModel, SyntheticConfig
from sae_lightning.sae import SparseAutoencoder


def median_seconds(fn: Callable[[int], object], rounds: int) -> float:
    fn(0)  # warm-up
    times = []
    for t in range(1, rounds + 1):
        start = time.perf_counter()
        fn(t)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def multinomial_batch(model: SparseGenerativeModel, n: int, g: torch.Generator) -> torch.Tensor:
    """The previous sampler, kept here as the reference the new one is compared with."""
    c = model.config
    chosen = torch.multinomial(
        model.probs.expand(n, -1), c.n_active, replacement=False, generator=g
    )
    amps = c.amplitude_min + (c.amplitude_max - c.amplitude_min) * torch.rand(
        n, c.n_active, generator=g
    )
    x = torch.einsum("na,nad->nd", amps, model.atoms[chosen])
    return x + c.noise_std * torch.randn(n, c.d, generator=g)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--n-latents", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--n-active", type=int, default=32, help="true atoms active per sample")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = SyntheticConfig(d=args.d_in, n_active=args.n_active, batch_size=args.batch)
    model = SparseGenerativeModel(config, seed=0)
    batch_s = median_seconds(model.batch, args.rounds)
    old_s = median_seconds(
        lambda t: multinomial_batch(model, args.batch, seeded_generator(0, t)), args.rounds
    )
    torch.manual_seed(0)
    sae = SparseAutoencoder(
        args.d_in,
        args.n_latents,
        {"name": "linear"},
        {"name": "linear"},
        {"name": "topk", "k": args.k},
    )
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    x = model.batch(0)
    dead = torch.zeros(args.n_latents, dtype=torch.bool)
    step_s = median_seconds(lambda t: train_step(sae, x, opt, dead), args.rounds)
    print(
        f"shape: d_in={args.d_in} n_latents={args.n_latents} k={args.k} batch={args.batch}, "
        f"{model.atoms.shape[0]} true atoms, {args.n_active} active, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"synthetic_batch_s={batch_s:.4f}")
    print(f"multinomial_batch_s={old_s:.4f}")
    print(f"bare_step_s={step_s:.4f}")
    print(f"speedup_over_multinomial={old_s / batch_s:.1f}")
    print(f"batch_over_step={batch_s / step_s:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
