"""Dead latents with and without the resampler, on synthetic superposition data.

A TopK SAE with as many latents as true atoms (256 in 32 dimensions, k 4, AuxK off) trained at
a high learning rate (0.05, no warm-up) loses about half its latents early, and they are
needed: every atom a dead latent leaves uncovered shows in the FVU. The same run (same seed,
data and schedule) is repeated with the ``resampler`` callback: Anthropic's procedure, the
``topk`` procedure, and the ``topk`` procedure with each of its three changes undone in turn;
a run with AuxK on (OpenAI's remedy, 1/32) is the reference. Every run goes through the real
stack (recipe -> registry -> SAEModule -> lightning.Trainer). The resampler fires at 1/8, 2/8,
3/8 and 4/8 of the run, so the second half trains the new latents (or lets them die again).

    python benchmarks/resampling.py     # 7 runs of 800 steps, about 30 s each on 1 thread
    python benchmarks/resampling.py --steps 1600 --threads 2

Reported: dead latents at the end (never firing on the 8192-sample validation set, and not
fired in the last ``dead_window_tokens`` training tokens), validation FVU, dictionary recovery
(MMCS) and the latents re-initialised at the last resample (``train/resampled``); then, for each
resampler run against the plain run measured here, the ratio of dead latents (goal < 0.5) and
the FVU difference (goal <= 0).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
PLAIN = "{name: topk, k: 4, aux_coefficient: 0.0}"
AUXK = "{name: topk, k: 4, aux_coefficient: 0.03125}"
RESAMPLERS = {  # run name -> resampler parameters
    "+ resampler, anthropic": "procedure: anthropic",
    "+ resampler, topk": "procedure: topk",
    "  topk, Adam moments zeroed": "procedure: topk, adam_second_moment: zero",
    "  topk, norm 1.0 x live": "procedure: topk, encoder_norm: mean_live, encoder_norm_scale: 1.0",
    "  topk, unclustered residual": "procedure: topk, direction: residual",
}


def base_overrides(steps: int, seed: int, out: Path, accelerator: str) -> dict[str, str]:
    every = steps // 8
    return {
        "output_dir": str(out),
        "trainer.accelerator": accelerator,
        "seed": str(seed),
        "data.d": "32",
        "data.n_atoms": "256",
        "data.batch_size": "1024",
        "model.d_sae": "256",
        "model.sparsity": PLAIN,
        "model.optimizer.lr": "0.05",
        "model.optimizer.warmup_steps": "0",
        "model.loss.dead_window_tokens": str(every * 1024 // 2),
        "trainer.max_steps": str(steps),
        "trainer.val_check_interval": str(steps),
        "trainer.enable_progress_bar": "false",
        "checkpoint.every_n_steps": str(steps),
    }


def resampler(steps: int, params: str) -> str:
    every = steps // 8
    return (
        f"[{{name: resampler, every_n_steps: {every}, max_resamples: 4, "
        f"n_candidates: 16384, {params}}}]"
    )


def run(name: str, base: dict[str, str], extra: dict[str, str]) -> dict[str, float]:
    from sae_lightning.recipe import load_recipe
    from sae_lightning.runner import fit

    over = {**base, **extra}
    start = time.perf_counter()
    metrics = fit(load_recipe([RECIPE], [*over.items(), ("name", name)]))
    d_sae = int(base["model.d_sae"])
    train_dead = next(v for k, v in metrics.items() if k.startswith("train/dead_fraction"))
    return {
        "dead_eval": round(metrics["val/dead_fraction_eval"] * d_sae),
        "dead_window": round(train_dead * d_sae),
        "fvu": metrics["val/fvu"],
        "mmcs": metrics["val/mmcs"],
        "resampled": metrics.get("train/resampled", 0.0),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800, help="training steps per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--accelerator", default="cpu", help="lightning accelerator: cpu, gpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import lightning.pytorch  # noqa: F401 - sets its loggers' levels on import; then quiet them

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")

    with tempfile.TemporaryDirectory() as tmp:
        base = base_overrides(args.steps, args.seed, Path(tmp), args.accelerator)
        runs = {"topk, AuxK off": run("plain", base, {})}
        for i, (name, params) in enumerate(RESAMPLERS.items()):
            runs[name] = run(f"resampled{i}", base, {"callbacks": resampler(args.steps, params)})
        runs["topk, AuxK 1/32 (reference)"] = run("auxk", base, {"model.sparsity": AUXK})

    d_sae = int(base["model.d_sae"])
    print(
        f"\n{args.steps} steps x 1024 tokens, d_in 32, d_sae {d_sae}, k 4, seed {args.seed}, "
        f"{args.accelerator}"
    )
    print(
        f"{'run':32s} {'dead(eval)':>10s} {'dead(window)':>12s} {'val FVU':>8s} {'MMCS':>6s} "
        f"{'last resample':>13s}"
    )
    for name, r in runs.items():
        print(
            f"{name:32s} {r['dead_eval']:>10d} {r['dead_window']:>12d} {r['fvu']:>8.4f} "
            f"{r['mmcs']:>6.3f} {r['resampled']:>13.0f}   ({r['seconds']:.0f} s)"
        )
    plain = runs["topk, AuxK off"]
    print()
    for name in RESAMPLERS:
        r = runs[name]
        ratio = r["dead_eval"] / max(plain["dead_eval"], 1)
        print(
            f"{name.strip()}: dead / plain {ratio:.3f} (goal < 0.5), "
            f"FVU - plain {r['fvu'] - plain['fvu']:+.4f} (goal <= 0)"
        )


if __name__ == "__main__":
    main()
