"""Training-step throughput: expander SAE against the dense TopK SAE, side by side in one process.

Both SAEs train through the real stack (recipe -> registry -> SAEModule -> lightning.Trainer) on
the same synthetic batches, generated before the fit (so no batch is made while a step runs). A
callback times each step from ``on_train_batch_start`` to ``on_train_batch_end`` (forward,
losses, backward, Adam, decoder constraints, logging). The two SAEs alternate in rounds, so a
change in machine load moves both; the reported ratio is the median over rounds of (dense step
time / expander step time), printed last as ``speedup_vs_dense_fused=<ratio>``.

    python benchmarks/expander_speed.py        # m=768, n=16384, k=32, d=16, batch 4096, 2 threads
    python benchmarks/expander_speed.py --rounds 5 --threads 2

Dense: encoder ``linear``, decoder ``linear``, sparsity ``topk``: the core's fused TopK path,
which never materialises the dense pre-activations and whose backward touches only the selected
latents. Expander: encoder and decoder ``expander`` with degree ``d``, sparsity ``signed_topk``,
on the expander's fused encode + selection. Both keep their default AuxK (weight 1/32).
"""

from __future__ import annotations

import argparse
import os
import statistics
import warnings
from typing import Any

import torch
from expander_common import StepTimer, generate_before_fit

from sae_lightning.config import RecipeConfig
from sae_lightning.runner import build_run

warnings.filterwarnings("ignore")


def recipe(kind: str, args: argparse.Namespace, steps: int) -> RecipeConfig:
    if kind == "dense":
        model: dict[str, Any] = {
            "encoder": {"name": "linear"},
            "decoder": {"name": "linear"},
            "sparsity": {"name": "topk", "k": args.k},
        }
    else:
        model = {
            "encoder": {"name": "expander", "d": args.d},
            "decoder": {"name": "expander"},
            "sparsity": {"name": "signed_topk", "k": args.k},
        }
    return RecipeConfig.model_validate(
        {
            "name": f"speed-{kind}",
            "data": {
                "name": "synthetic",
                "d": args.d_in,
                "n_active": 16,
                "batch_size": args.batch,
                "val_samples": 8,
            },
            "model": {"d_sae": args.d_sae, **model},
            "trainer": {
                "max_steps": steps,
                "accelerator": "cpu",
                "enable_progress_bar": False,
                "limit_val_batches": 0,
                "log_every_n_steps": 1,
            },
        }
    )


def time_steps(kind: str, args: argparse.Namespace) -> list[float]:
    """Step times of one short training run, warm-up steps dropped."""
    steps = args.warmup + args.steps
    run = build_run(recipe(kind, args, steps), log=False)
    generate_before_fit(run.datamodule, steps + 1)
    timer = StepTimer()
    run.trainer.callbacks.append(timer)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return timer.times[args.warmup :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=768, help="m, the input width")
    parser.add_argument("--d-sae", type=int, default=16384, help="n, the number of latents")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--d", type=int, default=16, help="expander degree")
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    times: dict[str, list[float]] = {"dense": [], "expander": []}
    ratios = []
    for r in range(args.rounds):
        medians = {}
        for kind in times:
            steps = time_steps(kind, args)
            times[kind] += steps
            medians[kind] = statistics.median(steps)
        ratios.append(medians["dense"] / medians["expander"])
        print(
            f"round {r}: dense {medians['dense']:.3f} s/step, expander "
            f"{medians['expander']:.3f} s/step, ratio {ratios[-1]:.2f}",
            flush=True,
        )

    print(
        f"\nm={args.d_in} n={args.d_sae} k={args.k} d={args.d} batch={args.batch} "
        f"threads={torch.get_num_threads()} torch={torch.__version__} cpus={os.cpu_count()}"
    )
    print("| SAE | median step (s) | tokens/s | learned decoder values |")
    print("|---|---|---|---|")
    stored = {"dense": args.d_in * args.d_sae, "expander": args.d * args.d_sae}
    for kind, ts in times.items():
        med = statistics.median(ts)
        print(f"| {kind} | {med:.3f} | {args.batch / med:,.0f} | {stored[kind]:,} |")
    ratio = statistics.median(ratios)
    print(f"\nexpander speed-up (median over rounds of dense/expander): {ratio:.2f}x")
    print(f"speedup_vs_dense_fused={ratio:.2f}")


if __name__ == "__main__":
    main()
